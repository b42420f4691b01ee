"""Start-up order of `antidistill serve`: the prometheus_client multiprocess directory is set before
anything of the command runs, so a first `make serve` (which prepares the embedded default, running
vLLM's offline engine, before it serves) has vLLM's and the gateway's series on /metrics; the
directory goes when the server stops, and one left by a killed server is swept at the next start.

The engine test runs the real ``--embedded-default`` path on the tiny teacher, placed where the
preparation finds a prepared SmolLM2 teacher (``$ANTIDISTILL_CACHE``/SmolLM2-135M-Instruct): stage 1
is cached, stages 2–5 run for real (the half-depth proxy, holdout traces from vLLM's offline engine,
the gradient, the demo tiers and keys)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from antidistill.benchmarks.launch import free_port, server_process
from antidistill.benchmarks.tiny.serving import build_models
from antidistill.server import cli
from antidistill.server.startup.metrics_dir import ENV, GRACE, LOCK, PREFIX, serving_metrics_dir, sweep_stale

from tests.helpers import scrape, total

TEACHER_DIR = "SmolLM2-135M-Instruct"  # prepare_smollm2's output directory in the cache


def own_metrics_dirs(pid: int) -> list[Path]:
    """The metrics directories ``antidistill serve`` with this pid made (their names carry it)."""
    return sorted(Path(tempfile.gettempdir()).glob(f"{PREFIX}{pid}-*"))


@pytest.mark.engine
def test_first_embedded_serve_has_vllm_and_gateway_series_and_removes_its_metrics_dir(tmp_path, monkeypatch):
    models = build_models(tmp_path / "models")
    cache = tmp_path / "cache"
    teacher = shutil.copytree(models.teacher, cache / TEACHER_DIR)
    config = json.loads((teacher / "config.json").read_text())
    config["max_position_embeddings"] = 2048  # the holdout engine runs with max_model_len 1024
    (teacher / "config.json").write_text(json.dumps(config))
    monkeypatch.delenv(ENV, raising=False)  # the server makes its own
    port, log = free_port(), tmp_path / "server.log"
    args = ["-m", "antidistill.server", "serve", "--embedded-default", "--port", str(port), "--max-model-len", "256"]
    args += ["--audit-log", str(tmp_path / "audit.jsonl")]
    env = {"ANTIDISTILL_CACHE": str(cache), "VLLM_CPU_KVCACHE_SPACE": "1"}
    with server_process(args, env, log, port, timeout=900) as (base, proc):
        assert "[3/5] holdout traces" in log.read_text()
        assert (cache / "holdout-gsm_symbolic.jsonl").is_file(), "the preparation ran vLLM's offline engine"
        keys = dict(line.strip().split(": ", 1) for line in (cache / "demo-keys.txt").read_text().splitlines())
        body = {"model": "smollm2-135m-instruct", "prompt": "The sum of 12", "max_tokens": 4, "temperature": 0}
        res = httpx.post(
            base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {keys['free']}"}, timeout=120
        )
        assert res.status_code == 200, res.text
        samples = scrape(base, (cache / "metrics-key.txt").read_text().strip())
        names = sorted({name for name, _ in samples})
        assert "vllm:num_requests_running" in names, names
        assert total(samples, "antidistill_requests_total", tier="free", status="200") == 1, names
        assert total(samples, "vllm:generation_tokens_total") > 0
        assert len(own_metrics_dirs(proc.pid)) == 1, "its metrics directory, named by its pid"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert own_metrics_dirs(proc.pid) == [], "removed when the server stopped"


def test_the_cli_sets_the_metrics_dir_before_it_imports_the_command(tmp_path, monkeypatch):
    """Structural: the command's module is imported inside the directory, so nothing it imports
    (vLLM, the preparation) can load prometheus_client before the directory is set."""
    (tmp_path / "probe_command.py").write_text(
        textwrap.dedent(
            f"""
            import os
            SEEN_AT_IMPORT = os.environ.get({ENV!r})
            def main(argv):
                return 0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setitem(cli.COMMANDS, "probe", cli.Command("probe_command", "probe", metrics_dir=True))
    assert cli.main(["probe"]) == 0
    seen = sys.modules["probe_command"].SEEN_AT_IMPORT
    assert seen and Path(seen).name.startswith(f"{PREFIX}{os.getpid()}-"), seen
    assert not Path(seen).exists() and ENV not in os.environ, "removed, and unset, when the command returned"
    assert cli.COMMANDS["serve"].metrics_dir


def age(path: Path, seconds: float) -> None:
    """Make ``path`` and its files look ``seconds`` old."""
    then = time.time() - seconds
    for p in [path, *path.iterdir()]:
        os.utime(p, (then, then))


def test_a_killed_servers_metrics_dir_is_swept_and_a_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.delenv(ENV, raising=False)
    killed = (
        "import os, signal; from antidistill.server.startup.metrics_dir import serving_metrics_dir\n"
        "with serving_metrics_dir() as path:\n"
        "    open(os.path.join(path, f'counter_{os.getpid()}.db'), 'wb').close()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    assert subprocess.run([sys.executable, "-c", killed], env=env).returncode == -signal.SIGKILL
    (dead,) = tmp_path.glob(PREFIX + "*")
    assert (dead / LOCK).is_file(), "left behind: SIGKILL runs no clean-up"
    dead_pid = int(next(dead.glob("counter_*.db")).stem.split("_")[1])
    legacy_dead, legacy_live = tmp_path / f"{PREFIX}abcd1234", tmp_path / f"{PREFIX}efgh5678"
    for path, pid in ((legacy_dead, dead_pid), (legacy_live, os.getpid())):  # an earlier version's: no lock
        path.mkdir()
        (path / f"counter_{pid}.db").write_bytes(b"")
    with serving_metrics_dir() as live:
        assert sweep_stale() == [], "every directory is younger than GRACE"
        for path in (dead, legacy_dead, legacy_live, Path(live)):
            age(path, 2 * GRACE)
        assert sorted(sweep_stale()) == sorted([dead, legacy_dead])
        assert Path(live).is_dir() and legacy_live.is_dir(), "a live owner's directory stays"
        os.environ.pop(ENV)
        with serving_metrics_dir() as second:  # a start sweeps too (nothing left to sweep here)
            assert second != live and Path(live).is_dir()
        os.environ[ENV] = live
    assert not Path(live).exists()
