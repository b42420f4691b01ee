"""The gateway's configuration travels from `antidistill serve` to the middleware vLLM builds as one
object; a gateway without the tiers file or the failure ledger does not start."""

from __future__ import annotations

from pathlib import Path

import pytest
from antidistill.server.config import MAX_BODY_ENV, GatewayConfig, GatewayConfigError


def test_export_and_read_back(tmp_path, monkeypatch):
    for name in ("ANTIDISTILL_TIERS", "ANTIDISTILL_FAILURE_LEDGER", MAX_BODY_ENV):
        monkeypatch.delenv(name, raising=False)
    config = GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin", audit_text=True, max_body_bytes=4096)
    config.export()
    assert GatewayConfig.from_env() == GatewayConfig(
        tiers=Path(tmp_path / "t.yaml").resolve(), ledger=tmp_path / "l.bin", audit_text=True, max_body_bytes=4096
    )


def test_missing_or_bad_settings_stop_the_gateway(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTIDISTILL_FAILURE_LEDGER", raising=False)
    monkeypatch.setenv("ANTIDISTILL_TIERS", str(tmp_path / "t.yaml"))
    with pytest.raises(GatewayConfigError, match="ANTIDISTILL_FAILURE_LEDGER not set"):
        GatewayConfig.from_env()
    monkeypatch.setenv("ANTIDISTILL_FAILURE_LEDGER", str(tmp_path / "l.bin"))
    monkeypatch.setenv(MAX_BODY_ENV, "0")
    with pytest.raises(GatewayConfigError, match="must be positive"):
        GatewayConfig.from_env()
