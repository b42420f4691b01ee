"""Async load generator for an OpenAI-compatible server (ours or plain vLLM).

    python -m antidistill.benchmarks.load --key free=ad-... --key pro=ad-... --mix free=3 --mix pro=1 \\
        --concurrency 32 --requests 256 --duration 300 --max-tokens 128 --json load.json

Prompts are reasoning-gym gsm_symbolic problems (chat). Reports requests/s, output tokens/s, TTFT,
inter-token latency and end-to-end latency (p50/p90/p99), and errors by status, as Markdown and
JSON. Only loopback targets unless ``--allow-remote`` is given. Streaming requests ask for the
usage chunk so output tokens are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
from antidistill.benchmarks.report import write_json
from antidistill.benchmarks.workload import questions


@dataclass
class Sample:
    tier: str
    status: int
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)


@dataclass
class LoadConfig:
    base_url: str
    model: str
    keys: dict[str, str]
    mix: dict[str, float]
    concurrency: int
    requests: int
    duration: float
    max_tokens: int
    stream: bool
    extra_body: dict
    prompts: list[str] = field(default_factory=list)  # default: gsm_symbolic questions
    budgets: list[int] = field(default_factory=list)  # max_tokens per prompt (parallel to prompts); default: max_tokens


def is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": qs[49], "p90": qs[89], "p99": qs[98]}


async def sse_lines(res: httpx.Response) -> AsyncIterator[str]:
    """Server-sent-event lines, split on LF only. httpx's ``aiter_lines`` also splits on U+0085,
    U+2028 and the like, which JSON leaves raw inside strings: a generated token containing one
    (random tiny models emit them) would cut an event in two."""
    buffer = ""
    async for text in res.aiter_text():
        *lines, buffer = (buffer + text).split("\n")
        for line in lines:
            yield line.removesuffix("\r")
    if buffer:
        yield buffer


async def one_request(
    client: httpx.AsyncClient, cfg: LoadConfig, tier: str, question: str, max_tokens: int | None = None
) -> Sample:
    body = {
        "model": cfg.model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": cfg.max_tokens if max_tokens is None else max_tokens,
        "stream": cfg.stream,
        **cfg.extra_body,
    }
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {cfg.keys[tier]}"} if cfg.keys.get(tier) else {}
    start = time.perf_counter()
    sample = Sample(tier, 0)
    try:
        if not cfg.stream:
            res = await client.post("/v1/chat/completions", json=body, headers=headers)
            sample.status = res.status_code
            if res.status_code == 200:
                sample.output_tokens = res.json()["usage"]["completion_tokens"]
        else:
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as res:
                sample.status = res.status_code
                last = None
                async for line in sse_lines(res):
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        sample.output_tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            sample.ttft = now - start
                        else:
                            sample.itl.append(now - last)
                        last = now
    except httpx.HTTPError:
        sample.status = -1
    except json.JSONDecodeError:  # a malformed event: counted as an error, not a crash of the run
        sample.status = -2
    sample.e2e = time.perf_counter() - start
    return sample


async def run_load(
    cfg: LoadConfig, seed: int = 0, transport: httpx.AsyncBaseTransport | None = None
) -> tuple[list[Sample], float]:
    """Keep ``concurrency`` requests in flight until ``requests`` are done or ``duration`` passes.
    Request i sends prompt i (cycling through the pool) with that prompt's budget."""
    rng = random.Random(seed)
    pool = cfg.prompts or questions(min(cfg.requests, 512))
    if cfg.budgets and len(cfg.budgets) != len(pool):
        raise ValueError(f"{len(cfg.budgets)} budgets for {len(pool)} prompts")
    tiers, weights = list(cfg.mix), list(cfg.mix.values())
    samples: list[Sample] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + cfg.duration
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    async with httpx.AsyncClient(base_url=cfg.base_url, timeout=600, limits=limits, transport=transport) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < cfg.requests and time.perf_counter() < deadline:
                i, issued = issued % len(pool), issued + 1
                tier = rng.choices(tiers, weights)[0]
                budget = cfg.budgets[i] if cfg.budgets else None
                samples.append(await one_request(client, cfg, tier, pool[i], budget))

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    return samples, time.perf_counter() - start


def summarize(samples: list[Sample], elapsed: float) -> dict:
    ok = [s for s in samples if s.status == 200]
    tokens = sum(s.output_tokens for s in ok)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "output_tokens_per_s": tokens / elapsed,
        "output_tokens": tokens,
        "ttft_s": percentiles([s.ttft for s in ok if s.ttft is not None]),
        "itl_s": percentiles([x for s in ok for x in s.itl]),
        "e2e_s": percentiles([s.e2e for s in ok]),
        "errors_by_status": dict(Counter(str(s.status) for s in samples if s.status != 200)),
        "by_tier": {t: sum(1 for s in ok if s.tier == t) for t in sorted({s.tier for s in samples})},
    }


def markdown(summary: dict) -> str:
    def fmt(p: dict) -> str:
        return " / ".join("–" if v is None else f"{1000 * v:.0f}" for v in p.values())

    return "\n".join(
        [
            "| requests ok | req/s | output tok/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms "
            "| e2e p50/p90/p99 ms | errors |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {summary['ok']}/{summary['requests']} | {summary['requests_per_s']:.2f} | "
            f"{summary['output_tokens_per_s']:.1f} | {fmt(summary['ttft_s'])} | {fmt(summary['itl_s'])} | "
            f"{fmt(summary['e2e_s'])} | {summary['errors_by_status'] or 'none'} |",
        ]
    )


def pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--allow-remote", action="store_true", help="permit a non-loopback target")
    ap.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    ap.add_argument("--key", action="append", default=[], metavar="TIER=KEY")
    ap.add_argument("--mix", action="append", default=[], metavar="TIER=WEIGHT", help="default: equal over keys")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--duration", type=float, default=600, help="stop issuing after this many seconds")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--ignore-eos", action="store_true", help="fixed-length outputs (vLLM extension)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    if not (is_loopback(args.base_url) or args.allow_remote):
        raise SystemExit(f"{args.base_url} is not a loopback address; pass --allow-remote to load it")
    keys = pairs(args.key, "--key") or {"anonymous": ""}
    mix = {k: float(v) for k, v in pairs(args.mix, "--mix").items()} or dict.fromkeys(keys, 1.0)
    model = (
        args.model
        or httpx.get(
            args.base_url + "/v1/models", headers={"Authorization": f"Bearer {next(iter(keys.values()))}"}
        ).json()["data"][0]["id"]
    )
    cfg = LoadConfig(
        args.base_url,
        model,
        keys,
        mix,
        args.concurrency,
        args.requests,
        args.duration,
        args.max_tokens,
        not args.no_stream,
        {"ignore_eos": True} if args.ignore_eos else {},
    )
    samples, elapsed = asyncio.run(run_load(cfg))
    summary = summarize(samples, elapsed)
    table = markdown(summary)
    print(table)
    write_json(args.json, {"config": {**asdict(cfg), "keys": sorted(cfg.keys)}, "summary": summary})
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
