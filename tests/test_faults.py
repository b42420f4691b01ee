"""Faults on a real `antidistill serve` with a deliberately tiny KV cache: preemption under load keeps
greedy outputs and loses nothing; a killed engine process makes the server exit non-zero, loudly."""

from __future__ import annotations

import asyncio
import time

import httpx
import psutil
import pytest

from benchmarks.soak import wait_kv_idle
from server.launch import free_port, server_process
from tests.test_metrics import scrape, total
from tests.vllm_setup import antidistill_serve_args, build_models, write_tiers

# logprobs allowed so that a divergence can be checked against the reference's top-2 margin
TIERS = {
    "free": {"lambda": 3.0, "max_logprobs": 2},
    "pro": {"lambda": 1.0, "profile": "code", "max_logprobs": 2},
    "internal": {"lambda": 0.0, "max_logprobs": 2},
}
TIE = 1e-3  # logprob margin below which fp32 batch-shape noise may flip a greedy choice
KV_BLOCKS, BLOCK = 12, 32  # 384 tokens: one 256-token request fits, eight ~90-token requests do not
PROMPTS = [f"Question {i}: what is {i} plus {2 * i}?" for i in range(8)]


@pytest.fixture(scope="module")
def pressured(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    models = build_models(root)
    keys = write_tiers(root / "tiers.yaml", TIERS)
    port = free_port()
    args = antidistill_serve_args(models, root / "tiers.yaml", root / "audit.jsonl", port, ("math", "code"))
    args += ["--block-size", str(BLOCK), "--num-gpu-blocks-override", str(KV_BLOCKS)]
    log = root / "server.log"
    with server_process(args, {"VLLM_CPU_KVCACHE_SPACE": "1"}, log, port) as (base, proc):
        yield {"base": base, "keys": keys, "model": str(models.teacher), "log": log, "proc": proc}


async def greedy(client: httpx.AsyncClient, srv: dict, tier: str, prompt: str) -> tuple[list[int], list[dict]]:
    """Greedy token ids and, per step, the top-2 (processed) logprobs keyed by token id."""
    body = {
        "model": srv["model"],
        "prompt": prompt,
        "max_tokens": 72,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "logprobs": 2,
        "return_tokens_as_token_ids": True,
    }
    res = await client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {srv['keys'][tier]}"})
    assert res.status_code == 200, res.text
    choice = res.json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["top_logprobs"]


def first_divergence_is_a_tie(reference: tuple[list[int], list[dict]], other: list[int]) -> bool:
    """Identical, or different only from a step where the reference's top two were tied within TIE:
    batched and single-request fp32 matmuls round differently, which may flip an exact tie but
    nothing else (a corrupted proxy state after a preemption would diverge at a clear winner)."""
    ids, tops = reference
    step = next((k for k, (a, b) in enumerate(zip(ids, other, strict=True)) if a != b), None)
    if step is None:
        return True
    first, second = sorted(tops[step].values(), reverse=True)[:2]
    return first - second < TIE


def test_preemption_keeps_greedy_outputs(pressured):
    srv = pressured
    jobs = [(("free", "pro", "internal")[i % 3], p) for i, p in enumerate(PROMPTS)]

    async def alone() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=srv["base"], timeout=300) as client:
            return [await greedy(client, srv, tier, prompt) for tier, prompt in jobs]

    async def together() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=srv["base"], timeout=300) as client:
            return await asyncio.gather(*(greedy(client, srv, tier, prompt) for tier, prompt in jobs))

    reference = asyncio.run(alone())
    before = total(scrape(srv["base"]), "vllm:num_preemptions_total")
    assert before == 0, "one request at a time fits"
    pressured_out = asyncio.run(together())
    preemptions = total(scrape(srv["base"]), "vllm:num_preemptions_total")
    print(f"preemptions: {preemptions:g}")
    assert preemptions > 0, "the KV cache was small enough to force preemption"
    for i, (ref, (got, _)) in enumerate(zip(reference, pressured_out, strict=True)):
        assert first_divergence_is_a_tie(ref, got), f"request {i} diverged at a clear winner under preemption"
    assert sum(ref[0] == got[0] for ref, got in zip(reference, pressured_out, strict=True)) >= len(jobs) - 2
    used, _ = wait_kv_idle(srv["base"])
    assert used == 0, "preempted and finished rows released their proxy KV"


def test_engine_death_exits_nonzero(pressured):
    """SIGKILL the EngineCore child: the server stops by itself with status 1 and says why."""
    srv = pressured
    server = psutil.Process(srv["proc"].pid)
    engines = [p for p in server.children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert engines, [(p.pid, p.name(), p.cmdline()) for p in server.children(recursive=True)]
    engines[0].kill()
    start = time.monotonic()
    try:
        code = srv["proc"].wait(timeout=90)
    except Exception:
        pytest.fail("the server kept running after its engine died")
    waited = time.monotonic() - start
    print(f"server exited {code} {waited:.1f} s after the engine was killed")
    assert code == 1
    assert "antidistill: the vLLM engine process died, so the server stopped" in srv["log"].read_text()
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv["base"] + "/health", timeout=5)
