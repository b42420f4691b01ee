"""`antidistill serve` past one worker, on vLLM's CPU backend and the tiny models: tensor parallel,
pipeline parallel, data parallel and several API servers. In each, served tokens equal the
independent HF reference sampler at the tier's λ, alone and in a busy batch, and a request the proxy
cannot protect (an injected non-finite Δ) is refused on every API server, never served raw."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from antidistill.benchmarks.tiny.reference import ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS

from tests.helpers import Server, audit_until, engine_fixture, scrape, tiny_server, total

TIERS = {"guarded": {"lambda": 3.0, "min_lambda": 3.0}}
NAN_TOKEN = 300
LAMBDA, TOKENS = 3.0, 12
TOPOLOGIES = {
    "tp2": ["--tensor-parallel-size", "2"],
    "pp2": ["--pipeline-parallel-size", "2", "--no-enforce-eager"],  # eager PP: vLLM's CPU engine dies
    "dp2": ["--data-parallel-size", "2"],
    "api2": ["--api-server-count", "2"],
}


@engine_fixture(scope="module", slow=True)
def topology(request, tmp_path_factory) -> Iterator[tuple[str, Server]]:
    name = request.param
    extra = [*TOPOLOGIES[name], "--logits-processors", "tests.fault_injection:FaultyProcessor"]
    env = {"ANTIDISTILL_TEST_FAULTS": json.dumps({"nan_token": NAN_TOKEN})}
    with tiny_server(tmp_path_factory.mktemp(name), TIERS, extra_args=extra, env=env) as server:
        yield name, server


def prompts(srv: Server, count: int) -> list[list[int]]:
    texts = [f"Question {i}: Alice has {i} apples and buys {2 * i + 1} more, so" for i in range(count)]
    return [srv.models.tokenizer(t)["input_ids"] for t in texts]


def body(srv: Server, prompt: list[int], stream: bool = False) -> dict:
    return {
        "model": srv.model,
        "prompt": prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
    }


async def complete(client: httpx.AsyncClient, srv: Server, payload: dict) -> tuple[int, list[int]]:
    """(status, token ids received), streamed or not; a stream's error event ends it with no ids after."""
    headers = srv.auth("guarded")
    if not payload["stream"]:
        res = await client.post("/v1/completions", json=payload, headers=headers)
        return res.status_code, res.json()["choices"][0]["token_ids"] if res.status_code == 200 else []
    ids = []
    async with client.stream("POST", "/v1/completions", json=payload, headers=headers) as res:
        async for line in res.aiter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "error" not in event or not ids, "refused after tokens: none may be raw"
                ids += (event["choices"][0].get("token_ids") or []) if event.get("choices") else []
        return res.status_code, ids


async def batch(srv: Server, payloads: list[dict]) -> list[tuple[int, list[int]]]:
    async with httpx.AsyncClient(base_url=srv.base, timeout=300) as client:
        return await asyncio.gather(*(complete(client, srv, p) for p in payloads))


@pytest.mark.parametrize("topology", list(TOPOLOGIES), indirect=True)
def test_every_topology_serves_the_reference_and_fails_closed(topology):
    name, srv = topology
    theta, grad = srv.models.theta_and_grad("math")
    sampler = ReferenceSampler(srv.models.teacher, srv.models.proxy, theta, grad, EPSILONS["math"])
    cases = prompts(srv, 6)
    ((status, alone),) = asyncio.run(batch(srv, [body(srv, cases[0])]))
    expected = [sampler.generate(p, LAMBDA, TOKENS) for p in cases]
    assert status == 200 and alone == expected[0], (name, alone, expected[0])
    assert expected[0] != sampler.generate(cases[0], 0.0, TOKENS), "λ must change the tokens for this to test it"
    busy = asyncio.run(batch(srv, [body(srv, p, stream=i % 2 == 1) for i, p in enumerate(cases)]))
    for (status, ids), want in zip(busy, expected, strict=True):
        assert status == 200 and ids == want, (name, ids, want)
    # a request's audit line is written just after its response: wait for these seven first
    audited = len(audit_until(srv, lambda lines: len(lines) >= 1 + len(cases)))
    faulty = [body(srv, [NAN_TOKEN, *cases[i % len(cases)]], stream=i % 2 == 1) for i in range(12)]
    refused = asyncio.run(batch(srv, faulty))
    assert all(status == 503 and ids == [] for status, ids in refused), (name, refused)
    lines = audit_until(srv, lambda lines: len(lines) >= audited + len(faulty))[audited:]
    assert all(line["protection_failure"] == "non_finite" and line["status"] == 503 for line in lines)
    metrics = scrape(srv.base, srv.metrics_key)  # one /metrics for all API servers and workers
    assert total(metrics, "antidistill_requests_total", tier="guarded", status="503") >= len(faulty), name
    assert total(metrics, "antidistill_protection_failures_total", reason="non_finite") >= len(faulty), name
    sampled = total(metrics, "antidistill_sampled_tokens_total", tier="guarded")
    dose = total(metrics, "antidistill_sampled_delta_sum", tier="guarded") / max(sampled, 1)
    assert sampled > 0 and dose > 0, (name, sampled, dose)  # λ = 3 raises the served tokens' Δ above 0
    if name == "api2":  # the kernel spreads connections over both API servers: each refuses, none serves raw
        assert len({line["pid"] for line in lines}) == 2, lines
