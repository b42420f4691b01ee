"""Admission latency of the limit state: in memory vs shared through Redis (``--state``), at 32
concurrent clients on one event loop, as the gateway calls it (one admit per request, its release
after). Loopback; a redis-server of its own unless ``--redis URL`` is given.

    python -m antidistill.benchmarks.admission --out benchmarks/results/admission-cpu.json

Each client is one key of one shared account (key and account scopes, both with limits and an
escalation rule, high enough that nothing is refused), so every admission runs the full script.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis as redis_sync
from antidistill.benchmarks.report import write_json
from antidistill.server.gateway.limits.memory import MemoryState, Scope
from antidistill.server.gateway.limits.redis_state import RedisState
from antidistill.server.tiers import Escalation

RULE = Escalation.model_validate({"tokens_per_hour": 10**9, "lambda": 4})


def scopes(client: int) -> tuple[Scope, ...]:
    key = Scope(f"key:bench-{client}", "", 10**6, 10**9, 1000, RULE)
    account = Scope("account:bench", "account 'bench': ", 10**7, 10**10, 10**4, RULE)
    return key, account


async def measure(state: MemoryState | RedisState, clients: int, requests: int, warmup: int = 20) -> dict:
    latencies: list[float] = []
    local = [0]  # admissions the shared store did not answer in time (decided by this process alone)

    async def warm(i: int) -> None:
        for _ in range(warmup):
            await state.release((await state.admit(scopes(i), 64)).lease, 16)

    async def client(i: int) -> None:
        mine = scopes(i)
        for _ in range(requests):
            start = time.perf_counter()
            grant = await state.admit(mine, 64)
            latencies.append(time.perf_counter() - start)
            local[0] += isinstance(state, RedisState) and not grant.lease.shared
            await asyncio.sleep(0)  # the request runs: other clients admit meanwhile
            await state.release(grant.lease, 16)

    await warm(0)  # steady state is measured: connections open, scripts loaded, ...
    await asyncio.gather(*(warm(i) for i in range(clients)))
    if isinstance(state, RedisState):
        await asyncio.sleep(state.backoff + 0.1)  # ... and no warm-up timeout's backoff still running
    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    await state.close()
    ms = sorted(x * 1000 for x in latencies)
    return {
        "admissions": len(ms),
        "p50_ms": round(statistics.median(ms), 4),
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 4),
        "max_ms": round(ms[-1], 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "admissions_per_s": round(len(ms) / wall, 1),
        "local_fallbacks": local[0],
    }


@contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free loopback port (no persistence)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (make system-deps), or pass --redis URL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = subprocess.Popen([*args, "--dir", folder], stdout=subprocess.DEVNULL)
        try:
            client = redis_sync.Redis(port=port)
            for _ in range(100):
                try:
                    client.ping()
                    break
                except redis_sync.ConnectionError:
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=500, help="admissions per client and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds alternate the two states' order")
    ap.add_argument("--redis", help="an existing Redis (its db is flushed); default: start one")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    with redis_server() if args.redis is None else _given(args.redis) as url:
        version = redis_sync.Redis.from_url(url).info("server")["redis_version"]
        rounds = []
        for r in range(args.rounds):
            order = ("memory", "redis") if r % 2 == 0 else ("redis", "memory")
            result = {}
            for mode in order:
                redis_sync.Redis.from_url(url).flushdb()
                state = MemoryState() if mode == "memory" else RedisState(url)
                result[mode] = asyncio.run(measure(state, args.clients, args.requests))
            rounds.append(result)
            print(
                f"round {r + 1}: "
                + "; ".join(f"{m} p50 {v['p50_ms']} ms p99 {v['p99_ms']} ms" for m, v in result.items())
            )
    summary = {
        mode: {stat: statistics.median(r[mode][stat] for r in rounds) for stat in ("p50_ms", "p99_ms", "mean_ms")}
        for mode in ("memory", "redis")
    }
    ratio = {stat: round(summary["redis"][stat] / summary["memory"][stat], 1) for stat in ("p50_ms", "p99_ms")}
    print(f"{'':8}{'memory':>12}{'redis':>12}{'redis/memory':>14}")
    for stat in ("p50_ms", "p99_ms"):
        print(f"{stat:8}{summary['memory'][stat]:>12.4f}{summary['redis'][stat]:>12.4f}{ratio[stat]:>13.1f}×")
    write_json(
        args.out,
        {
            "clients": args.clients,
            "requests_per_client": args.requests,
            "rounds": rounds,
            "median_of_rounds": summary,
            "redis_over_memory": ratio,
            "redis_server": version,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
        },
    )


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    main()
