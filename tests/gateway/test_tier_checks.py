"""A tiers reload runs every start-up check on the new table (server/gateway/tier_checks.py, the rules'
one home) and keeps the old table on any failure, with one log line; /metrics answers the metrics
key only. Unit tests on the gateway object, no engine: the real-server side is in test_server.py."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from antidistill.proxy_worker.runtime.failure_ledger import create
from antidistill.server.gateway.config import ENGINE_ENV, GatewayConfig, GatewayConfigError
from antidistill.server.gateway.metrics_key import DISABLED, METRICS_KEY_ENV, MetricsKeyError, resolve_metrics_key
from antidistill.server.gateway.middleware import AntidistillationMiddleware
from antidistill.server.gateway.tier_checks import EngineLimits, TierCheckError, check_servable
from antidistill.server.tiers import load_tiers, new_key

RAW = EngineLimits(("math", "code"), 20.0, "raw_logprobs")
PROCESSED = EngineLimits(("math", "code"), 20.0, "processed_logprobs")
TIERS = {"free": {"lambda": 2.0, "max_lambda": 4.0}, "internal": {"lambda": 0.0, "max_logprobs": 5}}
METRICS_KEY = "m" * 40


def write(path: Path, tiers: dict, keys: list | None = None) -> Path:
    path.write_text(yaml.safe_dump({"tiers": tiers, "keys": keys or []}))
    return path


@pytest.mark.parametrize(
    ("tier", "engine", "needle"),
    [
        ({"lambda": 1.0, "profile": "prose"}, PROCESSED, "tiers.t.profile: 'prose' is not a loaded --gradient profile"),
        ({"lambda": 1.0, "max_lambda": 25.0}, PROCESSED, "tiers.t.max_lambda 25 exceeds --max-lambda 20"),
        (
            {"lambda": 1.0, "escalation": {"tokens_per_hour": 10, "lambda": 30.0}},
            PROCESSED,
            "tiers.t.escalation.lambda 30 exceeds --max-lambda 20",
        ),
        ({"lambda": 1.0, "max_logprobs": 5}, RAW, "would hand protected tier 't' the raw teacher's logprobs"),
    ],
)
def test_a_tier_the_engine_cannot_serve_is_named(tmp_path, tier, engine, needle):
    table = load_tiers(write(tmp_path / "t.yaml", {"t": tier}))
    with pytest.raises(TierCheckError) as err:
        check_servable(table, engine)
    assert needle in str(err.value) and str(tmp_path / "t.yaml") in str(err.value) and "\n" not in str(err.value)


def test_servable_tables_pass_and_raw_logprobs_stay_with_unprotected_tiers(tmp_path):
    table = load_tiers(write(tmp_path / "t.yaml", TIERS))
    check_servable(table, RAW)  # internal (λ = 0) may read raw logprobs; free (protected) reads none
    check_servable(table, PROCESSED)
    spec = {"tiers": {"free": {"lambda": 1.0}}, "accounts": {"a": {"escalation": {"tokens_per_hour": 9, "lambda": 21}}}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(TierCheckError, match=r"accounts\.a\.escalation\.lambda 21 exceeds --max-lambda 20"):
        check_servable(load_tiers(tmp_path / "a.yaml"), PROCESSED)


def test_the_config_carries_the_engine_limits_and_the_metrics_key(tmp_path):
    env: dict[str, str] = {}
    GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin", engine=RAW, metrics_key=METRICS_KEY).export(env)
    back = GatewayConfig.from_env(env)
    assert back.engine == RAW and back.metrics_key == METRICS_KEY
    assert METRICS_KEY not in repr(back), "the key is not printed with the configuration"
    GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin").export(env)
    assert METRICS_KEY_ENV not in env and ENGINE_ENV not in env, "nothing left behind from an earlier export"
    assert GatewayConfig.from_env(env).metrics_key is None
    for name, bad in [
        (METRICS_KEY_ENV, "short"),
        (ENGINE_ENV, '{"profiles": [], "max_lambda": -1}'),
        (ENGINE_ENV, "[]"),
    ]:
        with pytest.raises(GatewayConfigError):
            GatewayConfig.from_env({**env, name: bad})


def test_the_metrics_key_comes_from_one_place(tmp_path):
    key_file = tmp_path / "metrics.key"
    key_file.write_text(f"  {METRICS_KEY}\n")
    assert resolve_metrics_key(str(key_file), {}) == METRICS_KEY, "surrounding whitespace dropped, as Prometheus does"
    assert resolve_metrics_key(None, {METRICS_KEY_ENV: METRICS_KEY}) == METRICS_KEY
    assert resolve_metrics_key(None, {}) is None
    key_file.write_text("two words that are long enough to pass the length rule\n")
    for path, env, needle in [
        (str(key_file), {}, "without spaces"),
        (str(tmp_path / "none"), {}, "cannot read"),
        (str(key_file), {METRICS_KEY_ENV: METRICS_KEY}, "give the metrics key once"),
        (None, {METRICS_KEY_ENV: "x" * 31}, "at least 32"),
    ]:
        with pytest.raises(MetricsKeyError, match=needle):
            resolve_metrics_key(path, env)


class Lines(logging.Handler):
    """The gateway's log lines (its logger may not propagate to pytest's handler)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture()
def gateway(tmp_path) -> Iterator[tuple[AntidistillationMiddleware, Path, Lines, dict[str, str]]]:
    """A gateway started under ``--logprobs-mode raw_logprobs`` on a servable tiers file with one
    key per tier; SIGHUP's handler (installed by the gateway) is restored afterwards."""
    keys, entries = {}, []
    for tier in TIERS:
        keys[tier], digest = new_key()
        entries.append({"sha256": digest, "tier": tier})
    tiers = write(tmp_path / "tiers.yaml", TIERS, entries)
    config = GatewayConfig(
        tiers=tiers,
        ledger=create(tmp_path / "ledger.bin"),
        engine=RAW,
        metrics_key=METRICS_KEY,
        audit_log=str(tmp_path / "a"),
    )
    previous = signal.getsignal(signal.SIGHUP)
    lines = Lines()
    logger = logging.getLogger("antidistill.server.gateway")
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        yield AntidistillationMiddleware(_ok, config), tiers, lines, keys
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
        signal.signal(signal.SIGHUP, previous)


def test_reload_keeps_the_old_table_on_a_bad_file_or_a_failed_startup_check(gateway):
    mw, tiers, lines, _ = gateway
    old = mw.tiers
    tiers.write_text("tiers: [\n  free\n")
    assert mw.reload() is False and mw.tiers is old
    assert len(lines.lines) == 1 and "tiers reload failed, keeping the previous tiers" in lines.lines[0]
    assert "invalid YAML" in lines.lines[0] and "\n" not in lines.lines[0]
    lines.lines.clear()
    write(tiers, {**TIERS, "free": {"lambda": 2.0, "max_logprobs": 5}})  # valid YAML, unservable here
    assert mw.reload() is False and mw.tiers is old
    assert mw.tiers.spec.tiers["free"].max_logprobs is None, "the protected tier still gets no raw logprobs"
    assert len(lines.lines) == 1 and "raw teacher's logprobs" in lines.lines[0] and "'free'" in lines.lines[0]
    lines.lines.clear()
    write(tiers, {**TIERS, "free": {"lambda": 3.0, "max_lambda": 4.0}})
    assert mw.reload() is True and mw.tiers.spec.tiers["free"].lambda_ == 3.0
    assert len(lines.lines) == 1 and lines.lines[0].startswith("tiers reloaded from")


def test_a_gateway_does_not_start_on_an_unservable_file(tmp_path):
    tiers = write(tmp_path / "tiers.yaml", {"free": {"lambda": 1.0, "profile": "prose"}})
    config = GatewayConfig(tiers=tiers, ledger=create(tmp_path / "ledger.bin"), engine=PROCESSED)
    previous = signal.getsignal(signal.SIGHUP)
    try:
        with pytest.raises(TierCheckError, match="'prose' is not a loaded"):
            AntidistillationMiddleware(_ok, config)
    finally:
        signal.signal(signal.SIGHUP, previous)


async def _ok(scope, receive, send) -> None:
    """vLLM's app, reduced to what /metrics answers when it is reached."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"antidistill_requests_total 0\n"})


def get(mw: AntidistillationMiddleware, path: str, *authorization: str) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"authorization", a.encode()) for a in authorization]
    scope = {"type": "http", "method": "GET", "path": path, "headers": headers, "query_string": b""}
    asyncio.run(mw(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_metrics_open_to_the_metrics_key_only(gateway):
    mw, _, _, keys = gateway
    assert get(mw, "/metrics", f"Bearer {METRICS_KEY}")[0] == 200
    for auth in ((), (f"Bearer {keys['internal']}",), (f"Bearer {keys['free']}",), ("Bearer " + "m" * 39,)):
        status, headers, body = get(mw, "/metrics", *auth)
        assert status == 401 and headers[b"www-authenticate"] == b"Bearer", (auth, body)
        assert b"antidistill_" not in body
    assert get(mw, "/metrics", f"Bearer {METRICS_KEY}", f"Bearer {METRICS_KEY}")[0] == 400, "one credential"
    assert get(mw, "/health")[0] == 200 and get(mw, "/ping")[0] == 200, "probes stay open"
    mw.lifecycle.draining = True
    assert get(mw, "/metrics", f"Bearer {METRICS_KEY}")[0] == 200, "scraped while draining"
    assert get(mw, "/metrics")[0] == 401


def test_metrics_are_shut_without_a_metrics_key(tmp_path):
    tiers = write(tmp_path / "tiers.yaml", TIERS)
    config = GatewayConfig(tiers=tiers, ledger=create(tmp_path / "ledger.bin"), audit_log=str(tmp_path / "a"))
    previous = signal.getsignal(signal.SIGHUP)
    try:
        mw = AntidistillationMiddleware(_ok, config)
    finally:
        signal.signal(signal.SIGHUP, previous)
    for auth in ((), (f"Bearer {METRICS_KEY}",)):
        status, _, body = get(mw, "/metrics", *auth)
        assert status == 403 and DISABLED.encode() in body and b"--metrics-key-file" in body
