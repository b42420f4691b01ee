"""The gateway's configuration: one object, written by ``antidistill serve`` and read once by the
middleware. vLLM builds the middleware itself (``--middleware``) with no arguments, so the object
travels in environment variables; this module is the only place that names them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from antidistill.proxy_worker.runtime.failure_ledger import ENV_VAR as LEDGER_ENV

TIERS_ENV, AUDIT_ENV, AUDIT_TEXT_ENV = "ANTIDISTILL_TIERS", "ANTIDISTILL_AUDIT_LOG", "ANTIDISTILL_AUDIT_TEXT"
DRAIN_ENV, MAX_BODY_ENV = "ANTIDISTILL_DRAIN_TIMEOUT", "ANTIDISTILL_MAX_BODY_BYTES"


class GatewayConfigError(ValueError):
    """A gateway setting that cannot work; the server does not start."""


@dataclass(frozen=True)
class GatewayConfig:
    tiers: Path
    ledger: Path  # the worker's failure reports (proxy_worker/failure_ledger.py)
    audit_log: str = "audit.jsonl"  # "-": stderr
    audit_text: bool = False
    drain_timeout: float = 120.0
    max_body_bytes: int | None = None  # None: derived from the served model's max_model_len

    def export(self) -> None:
        """Hand the configuration to the middleware vLLM will build in this process."""
        os.environ[TIERS_ENV] = str(Path(self.tiers).resolve())
        os.environ[LEDGER_ENV] = str(self.ledger)
        os.environ[AUDIT_ENV] = self.audit_log
        os.environ[AUDIT_TEXT_ENV] = "1" if self.audit_text else "0"
        os.environ[DRAIN_ENV] = str(self.drain_timeout)
        if self.max_body_bytes is None:
            os.environ.pop(MAX_BODY_ENV, None)
        else:
            os.environ[MAX_BODY_ENV] = str(self.max_body_bytes)

    @classmethod
    def from_env(cls) -> GatewayConfig:
        missing = [name for name in (TIERS_ENV, LEDGER_ENV) if not os.environ.get(name)]
        if missing:
            raise GatewayConfigError(
                f"{', '.join(missing)} not set: the gateway is configured by `antidistill serve` (it needs the "
                "tiers file and the failure ledger, without which protection failures could not be refused)"
            )
        try:
            body = os.environ.get(MAX_BODY_ENV)
            config = cls(
                tiers=Path(os.environ[TIERS_ENV]),
                ledger=Path(os.environ[LEDGER_ENV]),
                audit_log=os.environ.get(AUDIT_ENV, "audit.jsonl"),
                audit_text=os.environ.get(AUDIT_TEXT_ENV) == "1",
                drain_timeout=float(os.environ.get(DRAIN_ENV, "120")),
                max_body_bytes=int(body) if body else None,
            )
        except ValueError as exc:
            raise GatewayConfigError(f"gateway configuration: {exc}") from None
        if config.max_body_bytes is not None and config.max_body_bytes <= 0:
            raise GatewayConfigError(f"{MAX_BODY_ENV} must be positive, got {config.max_body_bytes}")
        return config
