"""What tensor parallelism costs the proxy today: one `antidistill serve` per tensor-parallel size on
the tiny models, the same protected load on each, then each worker's resident memory and the proxy
step time from the workers' own histogram. Every rank runs a full proxy, so under TP = 2 the proxy's
memory and compute are paid twice for one Δ; this measures how much that is, side by side in one run.

    python -m antidistill.benchmarks.tp_cost --out benchmarks/results/tp-cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path

import httpx
from antidistill.benchmarks.launch import free_port, server_process
from antidistill.benchmarks.tiny.serving import antidistill_serve_args, build_models, write_tiers
from antidistill.server.gateway.metrics_key import write_metrics_key
from prometheus_client.parser import text_string_to_metric_families

STREAMS, TOKENS = 8, 32


def worker_rss_mib(server_pid: int) -> list[float]:
    """Resident memory of the server's vLLM worker processes (one per rank), in MiB."""
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        worker = fields.get("Name", "").strip().startswith("VLLM::Worker") or b"VLLM::Worker" in cmdline
        if worker and _descends_from(int(status.parent.name), server_pid):
            out.append(int(fields["VmRSS"].split()[0]) / 1024)
    return sorted(out)


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # it exited while we looked
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def step_seconds(text: str) -> tuple[float, float]:
    """(sum, count) of the proxy step histogram over every rank."""
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "antidistill_proxy_step_seconds_sum":
                total += sample.value
            elif sample.name == "antidistill_proxy_step_seconds_count":
                count += sample.value
    return total, count


async def load(base: str, key: str, model: str) -> float:
    body = {
        "model": model,
        "prompt": "Alice has 3 apples and",
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        results = await asyncio.gather(
            *(client.post("/v1/completions", json=body, headers=headers) for _ in range(STREAMS))
        )
        for res in results:
            res.raise_for_status()
        return loop.time() - start


def measure(root: Path, tp: int) -> dict:
    models = build_models(root)
    keys = write_tiers(root / "tiers.yaml", {"guarded": {"lambda": 3.0}})
    metrics_key = write_metrics_key(root / "metrics.key")
    port = free_port()
    args = [
        *antidistill_serve_args(models, root / "tiers.yaml", root / "audit.jsonl", port),
        "--metrics-key-file",
        str(root / "metrics.key"),
        "--tensor-parallel-size",
        str(tp),
    ]
    with server_process(args, {"VLLM_CPU_KVCACHE_SPACE": "1"}, root / "server.log", port) as (base, process):
        asyncio.run(load(base, keys["guarded"], str(models.teacher)))  # warm-up round
        wall = asyncio.run(load(base, keys["guarded"], str(models.teacher)))
        text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {metrics_key}"}).text
        total, count = step_seconds(text)
        rss = worker_rss_mib(process.pid)
    return {
        "tp": tp,
        "workers_rss_mib": rss,
        "proxy_step_ms": 1000 * total / max(count, 1),
        "steps": count,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tp-cost.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(Path(tmp) / f"tp{tp}", tp) for tp in (1, 2)]
    one, two = runs
    ratios = {
        "rss_per_rank_tp2_over_tp1": sum(two["workers_rss_mib"])
        / len(two["workers_rss_mib"])
        / one["workers_rss_mib"][0],
        "rss_total_tp2_over_tp1": sum(two["workers_rss_mib"]) / sum(one["workers_rss_mib"]),
        "proxy_step_tp2_over_tp1": two["proxy_step_ms"] / one["proxy_step_ms"],
        "wall_tp2_over_tp1": two["wall_s"] / one["wall_s"],
    }
    report = {"streams": STREAMS, "tokens": TOKENS, "runs": runs, "ratios": ratios}
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
