"""Metrics on the real server's /metrics after a scripted workload, scraped also by a REAL
Prometheus (Debian's package, with the metrics key as its scrape credentials) through its HTTP API;
the shipped deploy files pass promtool. /metrics opens to the metrics key only (server/gateway/metrics_key.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from antidistill.benchmarks.launch import free_port
from antidistill.benchmarks.tiny.serving import build_models
from antidistill.server.cli import main
from antidistill.server.gateway.config import ENGINE_ENV
from antidistill.server.gateway.metrics_key import METRICS_KEY_ENV, write_metrics_key
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Server, engine_fixture, metrics_text, scrape, tiny_server, total

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TIERS = {"free": {"lambda": 2.0}, "internal": {"lambda": 0.0}, "limited": {"lambda": 1.0, "rpm": 2}}


@engine_fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with tiny_server(tmp_path_factory.mktemp("metrics"), TIERS) as srv:
        yield srv


def complete(srv: Server, tier: str | None, n_tokens: int, stream: bool = False, **extra) -> httpx.Response:
    body = {
        "model": srv.model,
        "prompt": "The sum of 12",
        "max_tokens": n_tokens,
        "ignore_eos": True,
        "stream": stream,
        **extra,
    }
    return httpx.post(srv.base + "/v1/completions", json=body, headers=srv.auth(tier), timeout=120)


def test_scripted_workload_counts(server):
    srv = server
    for _ in range(2):
        assert complete(srv, "internal", 5).status_code == 200
    before = scrape(srv.base, srv.metrics_key)
    assert total(before, "antidistill_proxy_seconds_total") == 0, "no protected traffic yet: no proxy work"
    assert total(before, "antidistill_proxy_tokens_total") == 0
    protected = 0
    for n in (7, 9, 4):
        res = complete(srv, "free", n)
        assert res.status_code == 200
        protected += res.json()["usage"]["completion_tokens"]
    streamed = complete(srv, "free", 6, stream=True)
    assert streamed.status_code == 200 and '"usage":{' not in streamed.text.replace(" ", ""), "injected usage hidden"
    protected += 6
    assert complete(srv, None, 3).status_code == 401
    assert complete(srv, "free", 3, vllm_xargs={"ad_lambda": 0}).status_code == 403
    codes = [complete(srv, "limited", 2).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    protected += 4
    after = scrape(srv.base, srv.metrics_key)
    assert total(after, "antidistill_output_tokens_total", protected="true") == protected
    assert total(after, "antidistill_output_tokens_total", protected="false") == 10
    assert total(after, "antidistill_requests_total", tier="free", status="200") == 4
    assert total(after, "antidistill_requests_total", tier="free", status="403") == 1
    assert total(after, "antidistill_requests_total", tier="internal", status="200") == 2
    assert total(after, "antidistill_requests_total", tier="limited", status="429") == 1
    assert {c: total(after, "antidistill_rejections_total", code=c) for c in ("401", "403", "429")} == {
        "401": 1,
        "403": 1,
        "429": 1,
    }
    assert total(after, "antidistill_effective_lambda_count", tier="free") == 4
    assert total(after, "antidistill_effective_lambda_sum", tier="free") == 8.0
    assert total(after, "antidistill_proxy_seconds_total") > 0
    assert total(after, "antidistill_proxy_tokens_total", profile="math", phase="decode") > 0
    assert total(after, "antidistill_proxy_step_seconds_count", profile="math") > 0
    assert total(after, "antidistill_proxy_kv_tokens_capacity", profile="math") > 0
    assert total(after, "vllm:generation_tokens_total") > 0, "vLLM's own metrics on the same endpoint"
    for family in text_string_to_metric_families(metrics_text(srv.base, srv.metrics_key)):
        if family.name.startswith("antidistill_"):
            assert family.documentation, f"{family.name} has no HELP text"


def test_real_prometheus_scrapes_and_answers_promql(server, tmp_path):
    srv = server
    port = free_port()
    key_file = tmp_path / "metrics.key"
    key_file.write_text(srv.metrics_key + "\n")  # as a Secret or compose secret mounts it
    job = {
        "job_name": "antidistill",
        "authorization": {"credentials_file": str(key_file)},  # as deploy/prometheus/prometheus.yml
        "static_configs": [{"targets": [f"127.0.0.1:{srv.port}"]}],
    }
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [job]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert complete(srv, "free", 3).status_code == 200
        query = 'sum by (tier) (antidistill_requests_total{status="200"})'
        deadline, result = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            try:
                res = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query})
                # a starting Prometheus answers 503 "Service Unavailable" (plain text) until ready
                result = res.json()["data"]["result"] if res.status_code == 200 else []
                if any(r["metric"].get("tier") == "free" for r in result):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        tiers = {r["metric"]["tier"]: float(r["value"][1]) for r in result}
        assert tiers.get("free", 0) >= 1, result
        share = httpx.get(
            f"http://127.0.0.1:{port}/api/v1/query", params={"query": "antidistill_proxy_seconds_total"}
        ).json()["data"]["result"]
        assert share and float(share[0]["value"][1]) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_shipped_prometheus_files_pass_promtool():
    for args in (
        ["check", "config", "--syntax-only", str(DEPLOY / "prometheus" / "prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus" / "rules.yml")],
    ):
        out = subprocess.run(["promtool", *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    job = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert job["authorization"]["credentials_file"].startswith("/run/secrets/"), "it scrapes with the metrics key"


@pytest.fixture()
def restored_environ() -> Iterator[None]:
    """``antidistill serve`` hands its configuration to vLLM through the environment: undo that."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_serve_says_in_one_line_when_metrics_stay_shut(tmp_path, capsys, monkeypatch, restored_environ):
    """Up to vLLM's server (replaced here): without a metrics key, one start-up line says /metrics
    answers 403 and how to open it; with ``--metrics-key-file`` the key, and the engine limits a
    tiers reload is checked against, reach the gateway's configuration."""
    from vllm.entrypoints.launchers.api_server import entry

    models = build_models(tmp_path / "models")
    environs: list[dict[str, str]] = []

    async def run_server(args, **_kw) -> None:
        environs.append(dict(os.environ))

    monkeypatch.setattr(entry, "run_server", run_server)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("ANTIDISTILL_FAILURE_LEDGER", str(tmp_path / "ledger.bin"))
    monkeypatch.delenv(METRICS_KEY_ENV, raising=False)
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 1}}}))
    argv = ["serve", "--proxy", str(models.proxy), "--gradient", f"math={models.gradients['math']}"]
    argv += ["--tiers", str(tiers), "--model", str(models.teacher), "--max-model-len", "256", "--block-size", "32"]
    assert main(argv) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "/metrics" in line]
    assert len(said) == 1 and "403" in said[0] and "--metrics-key-file" in said[0], said
    assert METRICS_KEY_ENV not in environs[-1]
    key = write_metrics_key(tmp_path / "metrics.key")
    assert main([*argv, "--metrics-key-file", str(tmp_path / "metrics.key")]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if "/metrics" in line]
    assert environs[-1][METRICS_KEY_ENV] == key
    engine = json.loads(environs[-1][ENGINE_ENV])
    assert engine == {"profiles": ["math"], "max_lambda": 50.0, "logprobs_mode": "processed_logprobs"}
    os.environ[METRICS_KEY_ENV] = key  # restored_environ undoes this (and serve's own export)
    code = main([*argv, "--metrics-key-file", str(tmp_path / "metrics.key")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "give the metrics key once" in err and err.count("\n") == 0, err
