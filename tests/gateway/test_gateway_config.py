"""The gateway's configuration travels from `antidistill serve` to the middleware vLLM builds as one
object; a gateway without the tiers file or the failure ledger does not start."""

from __future__ import annotations

from pathlib import Path

import pytest
from antidistill.server.gateway.config import AUDIT_ENV, MAX_BODY_ENV, GatewayConfig, GatewayConfigError


def test_export_and_read_back(tmp_path):
    env: dict[str, str] = {}
    config = GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin", audit_text=True, max_body_bytes=4096)
    config.export(env)
    read = GatewayConfig.from_env(env)
    assert read == GatewayConfig(
        tiers=Path(tmp_path / "t.yaml").resolve(),
        ledger=tmp_path / "l.bin",
        audit_text=True,
        max_body_bytes=4096,
        tenant_salt_key=config.tenant_salt_key,
    )
    assert read.tenant_salt_key and len(read.tenant_salt_key) == 32, "every process of one server salts alike"


def test_missing_or_bad_settings_stop_the_gateway(tmp_path, monkeypatch):
    monkeypatch.delenv("ANTIDISTILL_FAILURE_LEDGER", raising=False)
    monkeypatch.setenv("ANTIDISTILL_TIERS", str(tmp_path / "t.yaml"))
    with pytest.raises(GatewayConfigError, match="ANTIDISTILL_FAILURE_LEDGER not set"):
        GatewayConfig.from_env()
    monkeypatch.setenv("ANTIDISTILL_FAILURE_LEDGER", str(tmp_path / "l.bin"))
    monkeypatch.setenv(MAX_BODY_ENV, "0")
    with pytest.raises(GatewayConfigError, match="--max-body-bytes 0: must be at least 1024"):
        GatewayConfig.from_env()


def test_audit_log_is_stderr_unless_a_path_is_given(tmp_path, monkeypatch):
    """A gateway started without an audit path writes no file where it runs."""
    monkeypatch.setenv("ANTIDISTILL_TIERS", str(tmp_path / "t.yaml"))
    monkeypatch.setenv("ANTIDISTILL_FAILURE_LEDGER", str(tmp_path / "l.bin"))
    for name in (AUDIT_ENV, MAX_BODY_ENV):
        monkeypatch.delenv(name, raising=False)
    assert GatewayConfig.from_env().audit_log == "-"
    monkeypatch.setenv(AUDIT_ENV, str(tmp_path / "a.jsonl"))
    assert GatewayConfig.from_env().audit_log == str(tmp_path / "a.jsonl")


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("state", "http://user:s3cret@host/", "--state: expected a redis://"),
        ("state_timeout", 30.0, r"--state-timeout 30: must be between 0\.01 and 5 seconds"),
        ("state_lease_seconds", 0.5, "--state-lease-seconds 0.5: must be at least 1"),
        ("gateway_max_skew", 0.0, "--gateway-max-skew 0: must be > 0"),
        ("max_body_bytes", 1000, "--max-body-bytes 1000: must be at least 1024"),
    ],
)
def test_serve_and_the_gateway_check_the_settings_by_one_rule(tmp_path, field, value, needle):
    """``GatewayConfig.validate`` holds every rule: `antidistill serve` runs it on its flags, the
    gateway on what it reads back, with the same message (the password in a URL never shown)."""
    config = GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin", **{field: value})
    with pytest.raises(GatewayConfigError, match=needle) as flagged:
        config.validate()
    env: dict[str, str] = {}
    config.export(env)
    with pytest.raises(GatewayConfigError, match=needle) as read:
        GatewayConfig.from_env(env)
    assert str(read.value) == f"gateway configuration: {flagged.value}" and "s3cret" not in str(read.value)
    assert GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin").validate().state is None
