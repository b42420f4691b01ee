"""Faults on a real `antidistill serve` with a deliberately tiny KV cache: preemption under load keeps
greedy outputs and loses nothing; a killed engine process makes the server exit non-zero, loudly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from antidistill.benchmarks.soak import wait_kv_idle
from antidistill.benchmarks.tiny.reference import LOGPROB_NOISE, first_divergence

from tests.helpers import Server, engine_fixture, scrape, tiny_server, total

# logprobs allowed so that a divergence can be checked against the reference's top-2 margin
TIERS = {
    "free": {"lambda": 3.0, "max_logprobs": 2},
    "pro": {"lambda": 1.0, "profile": "code", "max_logprobs": 2},
    "internal": {"lambda": 0.0, "max_logprobs": 2},
}

KV_BLOCKS, BLOCK = 12, 32  # 384 tokens: one 256-token request fits, eight ~90-token requests do not
PROMPTS = [f"Question {i}: what is {i} plus {2 * i}?" for i in range(8)]
Greedy = tuple[list[int], list[dict]]  # token ids, and per step the top-2 logprobs keyed by token id


@engine_fixture(scope="module")
def pressured(tmp_path_factory) -> Iterator[Server]:
    kv = ["--block-size", str(BLOCK), "--num-gpu-blocks-override", str(KV_BLOCKS)]
    with tiny_server(tmp_path_factory.mktemp("faults"), TIERS, profiles=("math", "code"), extra_args=kv) as srv:
        yield srv


async def greedy(client: httpx.AsyncClient, srv: Server, tier: str, prompt: str) -> Greedy:
    """Greedy token ids and, per step, the top-2 (processed) logprobs keyed by token id."""
    body = {
        "model": srv.model,
        "prompt": prompt,
        "max_tokens": 72,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "logprobs": 2,
        "return_tokens_as_token_ids": True,
    }
    res = await client.post("/v1/completions", json=body, headers=srv.auth(tier))
    assert res.status_code == 200, res.text
    choice = res.json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["top_logprobs"]


def compare(reference: Greedy, other: Greedy) -> tuple[int | None, float, float]:
    """Where `other` first leaves the reference's greedy path (None: never), the reference's top-2
    margin there, and the largest difference between the two runs' logprob of the chosen token on
    the shared prefix (the noise that batch shape and a preemption's recompute add)."""
    (ids, tops), (other_ids, other_tops) = reference, other
    step = first_divergence(ids, other_ids)
    shared = len(ids) if step is None else step
    noise = max(
        (abs(tops[k][f"token_id:{ids[k]}"] - other_tops[k][f"token_id:{ids[k]}"]) for k in range(shared)), default=0.0
    )
    if step is None:
        return None, float("inf"), noise
    first, second = sorted(tops[step].values(), reverse=True)[:2]
    return step, first - second, noise


def test_preemption_keeps_greedy_outputs(pressured):
    srv = pressured
    jobs = [(("free", "pro", "internal")[i % 3], p) for i, p in enumerate(PROMPTS)]

    async def alone() -> list[Greedy]:
        async with httpx.AsyncClient(base_url=srv.base, timeout=300) as client:
            return [await greedy(client, srv, tier, prompt) for tier, prompt in jobs]

    async def together() -> list[Greedy]:
        async with httpx.AsyncClient(base_url=srv.base, timeout=300) as client:
            return await asyncio.gather(*(greedy(client, srv, tier, prompt) for tier, prompt in jobs))

    reference = asyncio.run(alone())
    before = total(scrape(srv.base, srv.metrics_key), "vllm:num_preemptions_total")
    assert before == 0, "one request at a time fits"
    pressured_out = asyncio.run(together())
    preemptions = total(scrape(srv.base, srv.metrics_key), "vllm:num_preemptions_total")
    print(f"preemptions: {preemptions:g}")
    assert preemptions > 0, "the KV cache was small enough to force preemption"
    for i, (ref, got) in enumerate(zip(reference, pressured_out, strict=True)):
        step, margin, noise = compare(ref, got)
        print(f"request {i} ({jobs[i][0]}): logprob noise {noise:.2e}, diverged at {step} (margin {margin:.2e})")
        assert noise <= LOGPROB_NOISE, (
            f"request {i}: logprobs moved by {noise:.3g} under preemption (proxy state lost?)"
        )
        assert step is None or margin < 2 * LOGPROB_NOISE, (
            f"request {i} diverged at a clear winner (margin {margin:.3g})"
        )
    assert sum(ref[0] == got[0] for ref, got in zip(reference, pressured_out, strict=True)) >= len(jobs) - 2
    used, _ = wait_kv_idle(srv.base, srv.metrics_key)
    assert used == 0, "preempted and finished rows released their proxy KV"


def test_engine_death_exits_nonzero(pressured):
    """SIGKILL the EngineCore child: the server stops by itself with status 1 and says why."""
    srv = pressured
    server = psutil.Process(srv.process.pid)
    engines = [p for p in server.children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert engines, [(p.pid, p.name(), p.cmdline()) for p in server.children(recursive=True)]
    engines[0].kill()
    start = time.monotonic()
    try:
        code = srv.process.wait(timeout=90)
    except Exception:
        pytest.fail("the server kept running after its engine died")
    waited = time.monotonic() - start
    print(f"server exited {code} {waited:.1f} s after the engine was killed")
    assert code == 1
    assert "antidistill: the vLLM engine process died, so the server stopped" in srv.log.read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.base + "/health", timeout=5)
