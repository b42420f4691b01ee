"""Fail closed, end to end: a real `antidistill serve` (vLLM CPU engine, tiny models) whose proxy
cannot protect some requests. Every response is judged by its tokens against an independent HF
reference sampler: either exactly the protected output at the tier's λ, or a refusal (HTTP 503 /
a stream error event) — never λ = 0 text. A `degrade` tier is served with Δ = 0 and flagged. A
second server shows the capacity coupling: a pool that the same load used to overflow is now
followed by the teacher, so nothing falls back at all."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from functools import cache

import httpx
import pytest
from antidistill.benchmarks.tiny.reference import ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS
from antidistill.proxy_worker.runtime.protection import DEGRADE_STEPS

from tests.helpers import Server, audit_lines, audit_until, engine_fixture, scrape, tiny_server, total

TIERS = {
    "guarded": {"lambda": 3.0, "min_lambda": 3.0},
    "lenient": {"lambda": 3.0, "on_protection_failure": "degrade"},
}
NAN_TOKEN, RAISE_TOKEN = 300, 301  # prompts starting with these get the injected faults
POOL_TOKENS = 200  # the repro: 8 concurrent ~80-token requests cannot all fit
LAMBDA, MAX_TOKENS = 3.0, 64
FAULTS = {"pool_tokens": POOL_TOKENS, "nan_token": NAN_TOKEN, "raise_token": RAISE_TOKEN}


@engine_fixture(scope="module")
def faulty(tmp_path_factory) -> Iterator[Server]:
    extra = ["--logits-processors", "tests.fault_injection:FaultyProcessor"]
    env = {"ANTIDISTILL_TEST_FAULTS": json.dumps(FAULTS)}
    with tiny_server(tmp_path_factory.mktemp("fail-closed"), TIERS, extra_args=extra, env=env) as server:
        yield server


_samplers: dict[str, ReferenceSampler] = {}


def reference(models, lam: float, prompt: tuple[int, ...], max_tokens: int = MAX_TOKENS) -> list[int]:
    """The independent HF sampler's greedy tokens (one sampler per model set)."""
    if str(models.teacher) not in _samplers:
        theta, grad = models.theta_and_grad("math")
        _samplers[str(models.teacher)] = ReferenceSampler(models.teacher, models.proxy, theta, grad, EPSILONS["math"])
    return _generate(str(models.teacher), lam, prompt, max_tokens)


@cache
def _generate(teacher: str, lam: float, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    return _samplers[teacher].generate(list(prompt), lam, max_tokens)


def prompts(models, count: int) -> list[tuple[int, ...]]:
    texts = [f"Question {i}: Alice has {i} apples and buys {2 * i + 1} more, so" for i in range(count)]
    return [tuple(models.tokenizer(t)["input_ids"]) for t in texts]


def body(srv: Server, prompt: Sequence[int], stream: bool, max_tokens: int = MAX_TOKENS) -> dict:
    return {
        "model": srv.model,
        "prompt": list(prompt),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": stream,
    }


async def complete(
    client: httpx.AsyncClient, srv: Server, tier: str, payload: dict
) -> tuple[int, list[int], dict | None]:
    """(status, token ids received, the error object if refused) — streamed or not."""
    headers = srv.auth(tier)
    if not payload["stream"]:
        res = await client.post("/v1/completions", json=payload, headers=headers)
        data = res.json()
        if res.status_code != 200:
            return res.status_code, [], data["error"]
        return 200, data["choices"][0]["token_ids"], None
    ids, error = [], None
    async with client.stream("POST", "/v1/completions", json=payload, headers=headers) as res:
        if res.status_code != 200:
            return res.status_code, [], json.loads(await res.aread())["error"]
        async for line in res.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            assert error is None, f"nothing may follow a refusal, got {line}"
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            ids += event["choices"][0].get("token_ids") or [] if event["choices"] else []
    return 200, ids, error


def guarded(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["tier"] == "guarded"]


async def _concurrent(srv: Server, tier: str, payloads: list[dict]) -> list[tuple[int, list[int], dict | None]]:
    async with httpx.AsyncClient(base_url=srv.base, timeout=300) as client:
        return await asyncio.gather(*(complete(client, srv, tier, p) for p in payloads))


def test_overflowing_proxy_pool_refuses_and_never_serves_raw(faulty):
    models = faulty.models
    cases = prompts(models, 8)
    payloads = [body(faulty, p, stream=i % 2 == 1) for i, p in enumerate(cases)]
    before = total(scrape(faulty.base, faulty.metrics_key), "antidistill_protection_failures_total", reason="budget")
    audited = len(guarded(audit_lines(faulty)))
    results = asyncio.run(_concurrent(faulty, "guarded", payloads))
    # a request's audit line and metrics are written just after its response: wait for all eight
    lines = guarded(audit_until(faulty, lambda lines: len(guarded(lines)) >= audited + 8))[audited:]
    refused = 0
    for prompt, (status, ids, error), payload in zip(cases, results, payloads, strict=True):
        protected = reference(models, LAMBDA, prompt)
        raw = reference(models, 0.0, prompt)
        assert protected != raw, "the test needs prompts where protection changes the output"
        if error is None:
            assert status == 200 and ids == protected, "a served answer is the protected one, token for token"
            continue
        refused += 1
        assert error["code"] == 503 and "KV cache was full" in error["message"], error
        assert ids == protected[: len(ids)], "tokens streamed before the refusal were protected"
        if status == 200:
            assert payload["stream"] and ids, "only a stream that already sent tokens ends in an error event"
        else:
            assert status == 503 and ids == [], "refused before its first token: a plain 503"
    assert refused >= 1, "the pool cannot hold 8 requests of ~80 tokens: some must be refused"
    after = total(scrape(faulty.base, faulty.metrics_key), "antidistill_protection_failures_total", reason="budget")
    assert after - before == refused
    assert len(lines) == 8
    assert sum(line["protection_failure"] == "budget" for line in lines) == refused
    assert all(line["protected"] == (line["protection_failure"] is None) for line in lines)
    assert sum(line["status"] == 503 for line in lines) == sum(status == 503 for status, _, _ in results)
    # the engine keeps serving, correctly
    ((status, ids, error),) = asyncio.run(_concurrent(faulty, "guarded", [body(faulty, cases[0], False, 16)]))
    assert status == 200 and error is None and ids == reference(models, LAMBDA, cases[0], 16)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("token,reason", [(NAN_TOKEN, "non_finite"), (RAISE_TOKEN, "error")], ids=["nan", "raise"])
def test_injected_faults_are_refused_counted_and_audited(faulty, token, reason, stream):
    models = faulty.models
    prompt = (token, *prompts(models, 1)[0])
    good = prompts(models, 2)[1]
    before = total(
        scrape(faulty.base, faulty.metrics_key),
        "antidistill_protection_failures_total",
        reason=reason,
        action="refused",
    )
    audited = len(audit_lines(faulty))
    payloads = [body(faulty, prompt, stream, 16), body(faulty, good, stream, 16)]
    (status, ids, error), (good_status, good_ids, good_error) = asyncio.run(_concurrent(faulty, "guarded", payloads))
    assert error is not None and error["code"] == 503 and ids == [], "refused before any token"
    assert status == 503, "a refusal found before the first token is a plain 503, streamed or not"
    assert good_status == 200 and good_error is None, "the other request in the batch is unaffected"
    assert good_ids == reference(models, LAMBDA, good, 16)
    lines = audit_until(faulty, lambda lines: len(lines) >= audited + 2)[audited:]
    after = total(
        scrape(faulty.base, faulty.metrics_key),
        "antidistill_protection_failures_total",
        reason=reason,
        action="refused",
    )
    assert after == before + 1
    [line] = [line for line in lines if line["status"] == 503]
    assert line["protected"] is False and line["protection_failure"] == reason and line["unprotected_tokens"] == 0


def test_degrade_tier_serves_delta_zero_and_flags_it(faulty):
    """A transient fault on a degrade tier is served with Δ = 0 and flagged for DEGRADE_STEPS tokens;
    past that the request is refused (making the proxy fail is no way to harvest raw text)."""
    models = faulty.models
    prompt = (NAN_TOKEN, *prompts(models, 1)[0])
    before = total(scrape(faulty.base, faulty.metrics_key), "antidistill_unprotected_tokens_total", tier="lenient")
    audited = len(audit_lines(faulty))
    headers = faulty.auth("lenient")
    res = httpx.post(
        f"{faulty.base}/v1/completions", json=body(faulty, prompt, False, DEGRADE_STEPS), headers=headers, timeout=120
    )
    assert res.status_code == 200 and res.headers["x-antidistillation-protection"] == "degraded"
    raw = reference(models, 0.0, prompt, DEGRADE_STEPS)
    assert res.json()["choices"][0]["token_ids"] == raw, "Δ = 0 at every step"
    [line] = audit_until(faulty, lambda lines: len(lines) > audited)[audited:]
    assert line["protected"] is False and line["protection_failure"] == "non_finite"
    assert line["unprotected_tokens"] == DEGRADE_STEPS and line["refused"] is False
    ((status, ids, error),) = asyncio.run(_concurrent(faulty, "lenient", [body(faulty, prompt, True, 16)]))
    assert status == 200 and ids == raw and error is not None and error["code"] == 503, "then refused"
    [line] = audit_until(faulty, lambda lines: len(lines) > audited + 1)[audited + 1 :]
    assert line["refused"] is True and line["unprotected_tokens"] == DEGRADE_STEPS, "what was sent raw, counted"
    after = total(scrape(faulty.base, faulty.metrics_key), "antidistill_unprotected_tokens_total", tier="lenient")
    assert after == before + 2 * DEGRADE_STEPS


@engine_fixture(scope="module")
def coupled(tmp_path_factory) -> Iterator[Server]:
    """The same pool size that overflowed above, now with the teacher capped to follow it."""
    extra = ["--proxy-token-budget", "640", "--block-size", "32"]
    with tiny_server(tmp_path_factory.mktemp("coupled"), TIERS, extra_args=extra) as server:
        yield server


def test_coupled_capacity_serves_the_overflowing_load_fully_protected(coupled):
    log = coupled.log.read_text()
    assert "KV capacity: teacher 384 tokens (12 blocks × 32" in log and "proxy 640 tokens per profile" in log
    models = coupled.models
    cases = prompts(models, 8)  # 8 × ~80 tokens: more than the teacher's 384, so it queues and preempts
    results = asyncio.run(
        _concurrent(coupled, "guarded", [body(coupled, p, stream=i % 2 == 1) for i, p in enumerate(cases)])
    )
    for prompt, (status, ids, error) in zip(cases, results, strict=True):
        assert status == 200 and error is None, error
        assert ids == reference(models, LAMBDA, prompt)
    metrics = scrape(coupled.base, coupled.metrics_key)
    assert total(metrics, "antidistill_delta_fallbacks_total") == 0
    assert total(metrics, "antidistill_protection_failures_total") == 0


def test_shared_prefix_is_held_once_and_stays_exact(coupled):
    """8 requests sharing a 160-token prefix: the teacher (prefix caching) holds it once, and so must
    the proxy — 8 private copies (8 × 160+) would not fit the 640-token pool."""
    models = coupled.models
    prefix = list(models.tokenizer(" ".join(f"step {i} adds {i + 1}." for i in range(40)))["input_ids"])[:160]
    assert len(prefix) == 160
    cases = [tuple(prefix + list(p[:8])) for p in prompts(models, 8)]
    peak = 0.0

    async def load() -> list:
        nonlocal peak
        task = asyncio.ensure_future(_concurrent(coupled, "guarded", [body(coupled, p, False, 24) for p in cases]))
        headers = {"Authorization": f"Bearer {coupled.metrics_key}"}
        async with httpx.AsyncClient(base_url=coupled.base, headers=headers, timeout=30) as client:
            while not task.done():
                text = (await client.get("/metrics")).raise_for_status().text
                for line in text.splitlines():
                    if line.startswith("antidistill_proxy_kv_tokens_used{"):
                        peak = max(peak, float(line.rsplit(" ", 1)[1]))
                await asyncio.sleep(0.05)
        return await task

    results = asyncio.run(load())
    for prompt, (status, ids, error) in zip(cases, results, strict=True):
        assert status == 200 and error is None, error
        assert ids == reference(models, LAMBDA, prompt, 24), "rows reading shared blocks match the reference"
    bound = 160 + 8 * (16 + 8 + 24)  # the prefix once, then per row its last prefix block, suffix and output
    assert 0 < peak <= bound, f"proxy KV peaked at {peak} tokens, bound {bound} (8 private copies: {8 * 192})"


def long_question(models, tokens: int) -> str:
    """A question of about ``tokens`` tokens: with 64 tokens of output it outgrows the 200-token pool."""
    words = [f"Alice adds {i} apples." for i in range(200)]
    return next(
        " ".join(words[:n]) for n in range(1, 200) if len(models.tokenizer(" ".join(words[:n]))["input_ids"]) >= tokens
    )


ROUTES = {
    "responses": lambda srv, text, stream: {
        "model": srv.model,
        "input": text,
        "max_output_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    },
    "messages": lambda srv, text, stream: {
        "model": srv.model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": stream,
    },
}


def sse_events(text: str) -> list[tuple[str | None, dict]]:
    """A stream's (event name, JSON data) pairs, in order."""
    out = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        name = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = next((line[6:] for line in lines if line.startswith("data: ")), None)
        if data is not None:
            out.append((name, json.loads(data)))
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("api", ["responses", "messages"])
def test_a_budget_failure_on_responses_and_messages_ends_in_the_apis_own_error(faulty, api, stream):
    """A row that outgrows the proxy's pool: refused before its first token (a 503 in the API's own
    shape), or, once streaming, by the API's own error event with nothing after it; what came before
    is the protected text, never raw."""
    models = faulty.models
    text = long_question(models, 150)
    res = httpx.post(
        f"{faulty.base}/v1/chat/completions",
        json={
            "model": faulty.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 1,
            "return_token_ids": True,
        },
        headers=faulty.auth("guarded"),
        timeout=120,
    )
    prompt = tuple(res.json()["prompt_token_ids"])
    assert 150 < len(prompt) < POOL_TOKENS < len(prompt) + MAX_TOKENS, len(prompt)
    res = httpx.post(
        f"{faulty.base}/v1/{api}", json=ROUTES[api](faulty, text, stream), headers=faulty.auth("guarded"), timeout=300
    )
    protected = models.tokenizer.decode(reference(models, LAMBDA, prompt), skip_special_tokens=True)
    if not stream:
        assert res.status_code == 503 and "retry-after" in res.headers, res.text
        error = res.json()["error"] if api == "responses" else res.json()
        if api == "messages":
            assert error["type"] == "error" and error["error"]["type"] == "overloaded_error"
            error = error["error"]
        assert "KV cache was full" in error["message"]
        return
    assert res.status_code == 200, res.text
    events = sse_events(res.text)
    name, last = events[-1]
    assert name == "error" and last["type"] == "error", "the stream ends with the API's error event"
    message = last["message"] if api == "responses" else last["error"]["message"]
    assert "KV cache was full" in message
    if api == "responses":
        assert last["sequence_number"] == events[-2][1]["sequence_number"] + 1
        sent = "".join(e["delta"] for n, e in events if e.get("type") == "response.output_text.delta")
    else:
        sent = "".join(e["delta"].get("text") or "" for n, e in events if e.get("type") == "content_block_delta")
    assert sent and protected.startswith(sent.rstrip("\ufffd")), "what was sent before the refusal was protected"
