"""Soak: mixed-tier, mixed-λ streaming load for a fixed time while sampling memory.

    python -m antidistill.benchmarks.soak --minutes 30 --out benchmarks/results/soak-30min.json

Starts ``antidistill serve`` on the tiny test models (random weights; what is measured is the
serving machinery, not model quality), drives it with ``antidistill.benchmarks.load`` (streaming chat, tiers at
λ = 0, 1 and 3 on two gradient profiles), samples the RSS of the API-server process and of its
engine worker every few seconds, and after the load waits for the proxy KV gauge to return to 0.
It passes when there were no errors, neither process grew by more than ``--rss-bound-mib`` between
the first and the last quarter of the run (medians, after a warm-up), and the gauge is back at 0.
``make test`` runs the same code for 2 minutes (tests/gateway/test_reliability.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import yaml
from antidistill.benchmarks.load import LoadConfig, run_load, summarize
from antidistill.benchmarks.report import write_json
from prometheus_client.parser import text_string_to_metric_families

MIB = 1024 * 1024
SOAK_TIERS = {
    "free": {"lambda": 3.0, "max_tokens": 64},
    "pro": {"lambda": 1.0, "profile": "code"},
    "internal": {"lambda": 0.0},
}
SOAK_MIX = {"free": 2.0, "pro": 1.0, "internal": 1.0}
# short prompts: the tiny models' tokenizer is trained on a small corpus and their context is 256 tokens
SOAK_PROMPTS = [f"What is {a} plus {b}? Show your steps." for a in range(3, 30, 3) for b in range(2, 20, 4)]


@dataclass
class RssSample:
    t: float
    server: int
    worker: int


def process_rss(pid: int) -> tuple[int, int]:
    """RSS of the server process and the sum over its children (the engine core and its helpers)."""
    proc = psutil.Process(pid)
    children = 0
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            children += child.memory_info().rss
    return proc.memory_info().rss, children


class RssSampler(threading.Thread):
    """Samples ``process_rss`` every ``every`` seconds until stopped."""

    def __init__(self, pid: int, every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[RssSample] = []
        self.stopped = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.stopped.is_set():
            server, worker = process_rss(self.pid)
            self.samples.append(RssSample(time.monotonic() - self.start_time, server, worker))
            self.stopped.wait(self.every)


def rss_summary(samples: list[RssSample], which: str, warmup: float) -> dict:
    """Start/end/max and the growth between the first and last quarter (medians, after warm-up)."""
    values = [getattr(s, which) for s in samples]
    steady = [getattr(s, which) for s in samples if s.t >= warmup] or values
    quarter = max(1, len(steady) // 4)
    growth = statistics.median(steady[-quarter:]) - statistics.median(steady[:quarter])
    late = [s for s in samples if s.t >= samples[-1].t / 2]
    slope = 0.0
    if len(late) > 1:
        slope = statistics.linear_regression([s.t for s in late], [getattr(s, which) for s in late]).slope
    return {
        "start_mib": values[0] / MIB,
        "end_mib": values[-1] / MIB,
        "max_mib": max(values) / MIB,
        "growth_mib": growth / MIB,
        "late_slope_mib_per_hour": slope * 3600 / MIB,  # least squares over the second half of the run
    }


def kv_tokens_used(base: str, metrics_key: str) -> float:
    """Sum of antidistill_proxy_kv_tokens_used over profiles on the server's /metrics (which needs
    the server's metrics key: a refusal raises, it never reads as an idle pool)."""
    res = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {metrics_key}"}, timeout=10)
    res.raise_for_status()
    text = res.text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "antidistill_proxy_kv_tokens_used"
    )


def wait_kv_idle(base: str, metrics_key: str, timeout: float = 30) -> tuple[float, float]:
    """Poll the proxy KV gauge until it reads 0; returns (last value, seconds waited)."""
    start = time.monotonic()
    used = kv_tokens_used(base, metrics_key)
    while used and time.monotonic() - start < timeout:
        time.sleep(0.5)
        used = kv_tokens_used(base, metrics_key)
    return used, time.monotonic() - start


def soak(
    base: str,
    model: str,
    keys: dict[str, str],
    server_pid: int,
    seconds: float,
    concurrency: int = 8,
    max_tokens: int = 24,
    sample_every: float = 3.0,
    rss_bound_mib: float = 64.0,
    *,
    metrics_key: str,
) -> dict:
    """Run the load for ``seconds`` while sampling memory; the result says whether it passed."""
    sampler = RssSampler(server_pid, sample_every)
    sampler.start()
    cfg = LoadConfig(
        base_url=base,
        model=model,
        keys=keys,
        mix={tier: SOAK_MIX.get(tier, 1.0) for tier in keys},
        concurrency=concurrency,
        requests=10**9,
        duration=seconds,
        max_tokens=max_tokens,
        stream=True,
        extra_body={"ignore_eos": True},
        prompts=SOAK_PROMPTS,
    )
    samples, elapsed = asyncio.run(run_load(cfg))
    kv_after, waited = wait_kv_idle(base, metrics_key)
    sampler.stopped.set()
    sampler.join()
    load = summarize(samples, elapsed)
    warmup = min(30.0, seconds / 4)
    rss = {which: rss_summary(sampler.samples, which, warmup) for which in ("server", "worker")}
    errors = sum(load["errors_by_status"].values())
    return {
        "duration_s": elapsed,
        "requests": load["requests"],
        "ok": load["ok"],
        "errors": errors,
        "errors_by_status": load["errors_by_status"],
        "output_tokens": load["output_tokens"],
        "by_tier": load["by_tier"],
        "rss_samples": len(sampler.samples),
        "rss_sample_every_s": sample_every,
        "rss": rss,
        "rss_bound_mib": rss_bound_mib,
        "proxy_kv_tokens_used_after_idle": kv_after,
        "kv_idle_wait_s": waited,
        "passed": errors == 0
        and load["ok"] > 0
        and kv_after == 0
        and all(r["growth_mib"] <= rss_bound_mib for r in rss.values()),
        "series": [(round(s.t, 1), round(s.server / MIB, 1), round(s.worker / MIB, 1)) for s in sampler.samples],
    }


def main() -> None:
    from antidistill.benchmarks.launch import free_port, server_process
    from antidistill.benchmarks.tiny.serving import antidistill_serve_args, build_models, write_tiers
    from antidistill.server.gateway.metrics_key import write_metrics_key

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--rss-bound-mib", type=float, default=64.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="antidistill-soak-") as tmp:
        root = Path(tmp)
        models = build_models(root)
        keys = write_tiers(root / "tiers.yaml", SOAK_TIERS)
        port = free_port()
        serve = antidistill_serve_args(models, root / "tiers.yaml", root / "audit.jsonl", port, ("math", "code"))
        metrics_key = write_metrics_key(root / "metrics.key")  # the KV gauge is read on /metrics
        serve += ["--metrics-key-file", str(root / "metrics.key")]
        with server_process(serve, {"VLLM_CPU_KVCACHE_SPACE": "1"}, root / "server.log", port) as (base, proc):
            result = soak(
                base,
                str(models.teacher),
                keys,
                proc.pid,
                args.minutes * 60,
                args.concurrency,
                args.max_tokens,
                args.sample_every,
                args.rss_bound_mib,
                metrics_key=metrics_key,
            )
    summary = {k: v for k, v in result.items() if k != "series"}
    print(yaml.safe_dump(summary, sort_keys=False))
    write_json(args.out, {"config": vars(args) | {"out": str(args.out)}, "result": result})
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
