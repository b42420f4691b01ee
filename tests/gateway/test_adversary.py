"""The gateway from the harvester's side: each test is an exact request sequence a client who collects
traces to distil the teacher would send, against a real `antidistill serve` (vLLM CPU engine, tiny
models), judged by what came back — status, λ header, tokens (against the reference sampler),
logprobs present, audit counts. docs/security.md lists each attack with what the server does."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from antidistill.benchmarks.tiny.reference import ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS

from tests.helpers import Server, audit_until, engine_fixture, scrape, tiny_server, total

ESCALATE = {"tokens_per_hour": 30, "lambda": 4.0, "decay_minutes": 10}
TIERS = {
    "watched": {"lambda": 0.5, "max_lambda": 1.0, "escalation": ESCALATE},  # drops streams
    "open": {  # a floor-0 tier with logprobs at λ = 0, escalated by volume
        "lambda": 0.0,
        "max_lambda": 2.0,
        "max_logprobs": 5,
        "allow_prompt_logprobs": True,
        "escalation": {"tokens_per_hour": 30, "lambda": 1.0},
    },
    "metered": {"lambda": 1.0, "tpm": 120},
    "paced": {"lambda": 1.0, "rpm": 5},
    "plain": {"lambda": 1.0},
    "neighbour": {"lambda": 1.0},  # another tenant
}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
PROMPT = "Alice has 3 apples and buys"


@engine_fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[Server]:
    with tiny_server(tmp_path_factory.mktemp("adversary"), TIERS) as server:
        yield server


@pytest.fixture(scope="module")
def reference(srv: Server) -> ReferenceSampler:
    theta, grad = srv.models.theta_and_grad("math")
    return ReferenceSampler(srv.models.teacher, srv.models.proxy, theta, grad, EPSILONS["math"])


def ids(srv: Server, text: str = PROMPT) -> list[int]:
    return srv.models.tokenizer(text)["input_ids"]


def body(srv: Server, max_tokens: int = 8, **fields) -> dict:
    base = {"model": srv.model, "prompt": ids(srv), "max_tokens": max_tokens, "temperature": 0}
    return {**base, "ignore_eos": True, "return_token_ids": True, **fields}


def post(srv: Server, tier: str, payload: dict, path: str = COMPLETIONS) -> httpx.Response:
    return httpx.post(srv.base + path, json=payload, headers=srv.auth(tier), timeout=120)


def drop_stream(srv: Server, tier: str, read: int, max_tokens: int = 48) -> int:
    """Open a stream, read ``read`` content events, close the socket: what a harvester does to
    skip the final usage event. Returns the events read."""
    payload = body(srv, max_tokens, stream=True)
    seen = 0
    with httpx.stream("POST", srv.base + COMPLETIONS, json=payload, headers=srv.auth(tier), timeout=120) as res:
        assert res.status_code == 200, res.read()
        for line in res.iter_lines():
            if line.startswith("data: {") and '"choices":[{' in line.replace(" ", ""):
                seen += 1
                if seen == read:
                    break
    return seen


def test_dropped_streams_are_counted_and_escalate_the_key(srv, reference):
    """Before: four streams closed after 40 of 48 tokens were audited with completion_tokens 0 and
    never escalated the key. Now each is charged at least what it read, and the next request of
    the key is served at the escalated λ (its tokens are the reference sampler's at λ = 4)."""
    for _ in range(2):
        assert drop_stream(srv, "watched", read=20) == 20
    charged = audit_until(srv, lambda ls: sum(x["tier"] == "watched" for x in ls) >= 2)
    drops = [x for x in charged if x["tier"] == "watched"]
    assert len(drops) == 2 and all(x["completion_tokens"] >= 20 for x in drops), drops
    res = post(srv, "watched", body(srv, 8))
    assert res.status_code == 200 and res.headers["x-antidistillation-lambda"] == "4", res.headers
    assert res.json()["choices"][0]["token_ids"] == reference.generate(ids(srv), 4.0, 8)


def test_a_stream_reports_usage_only_where_the_client_asked(srv):
    """The running counts the gateway forces on every stream are stripped again unless asked for."""
    quiet = httpx.post(srv.base + COMPLETIONS, json=body(srv, 4, stream=True), headers=srv.auth("plain"), timeout=120)
    assert quiet.status_code == 200 and '"usage"' not in quiet.text, quiet.text[:400]
    asked = {"include_usage": True, "continuous_usage_stats": True}
    loud = httpx.post(
        srv.base + COMPLETIONS,
        json=body(srv, 4, stream=True, stream_options=asked),
        headers=srv.auth("plain"),
        timeout=120,
    )
    assert loud.text.count('"usage"') == 5, "one per token and the final one, as vLLM sends them"


def test_an_escalated_floor_zero_key_loses_the_raw_channels(srv):
    """Before: a floor-0 tier escalated to λ = 1 still answered 200 with top-5 logprobs and raw prompt
    logprobs. Now the escalated key's side channels are the protected defaults: 403 for both."""
    scored = body(srv, 2, logprobs=2, prompt_logprobs=1)
    assert post(srv, "open", scored).status_code == 200, "the tier's own channels, before escalation"
    for _ in range(5):  # 5 × 8 output tokens > 30 per hour
        assert post(srv, "open", body(srv, 8)).status_code == 200
    res = post(srv, "open", body(srv, 2, prompt_logprobs=1))
    assert res.status_code == 403 and res.json()["error"]["param"] == "prompt_logprobs", res.text
    res = post(srv, "open", body(srv, 2, logprobs=2))
    assert res.status_code == 403 and res.json()["error"]["param"] == "logprobs", res.text
    res = post(srv, "open", body(srv, 1, echo=True, logprobs=0))
    assert res.status_code == 403, "echo + logprobs scores the prompt: closed too"
    res = post(srv, "open", body(srv, 2))
    assert res.status_code == 200 and res.headers["x-antidistillation-lambda"] == "1"


def test_a_list_of_prompts_is_counted_per_prompt(srv):
    """Before: ``prompt: ["a b c"] × 8, max_tokens: 32`` on a 120-tpm tier was 200 (296 tokens).
    Now a list is charged prompts × n × max_tokens (tpm) and prompts × n requests (rpm)."""
    listed = {"model": srv.model, "prompt": ["a b c"] * 8, "max_tokens": 32}
    res = post(srv, "metered", listed)
    assert res.status_code == 429 and "tokens per minute" in res.json()["error"]["message"], res.text
    harvest = {"model": srv.model, "prompt": ["a b c"] * 1024, "max_tokens": 1}
    assert post(srv, "metered", harvest).status_code == 429
    assert post(srv, "metered", body(srv, 4)).status_code == 200, "one prompt within the budget is served"
    res = post(srv, "paced", {"model": srv.model, "prompt": ["a b c"] * 6, "max_tokens": 1})
    assert res.status_code == 429 and "6 sequences" in res.json()["error"]["message"], res.text
    res = post(srv, "paced", {"model": srv.model, "prompt": ["a b c"] * 2, "max_tokens": 1, "n": 2})
    assert res.status_code == 200 and len(res.json()["choices"]) == 4


def test_uncapped_output_is_budgeted_at_the_context_left(srv):
    """Before: a chat without max_tokens on a tier without max_tokens was budgeted on its prompt alone.
    Now it is budgeted at max_model_len − prompt, which a 120-tpm tier cannot hold."""
    messages = [{"role": "user", "content": PROMPT}]
    res = post(srv, "metered", {"model": srv.model, "messages": messages}, CHAT)
    assert res.status_code == 429 and "tokens per minute" in res.json()["error"]["message"], res.text
    res = post(srv, "metered", {"model": srv.model, "messages": messages, "max_tokens": 4}, CHAT)
    assert res.status_code == 200


@pytest.mark.parametrize(
    "xargs", [{"kv_transfer_params": "x"}, {"ec_transfer_params": {}}, {"anything": 1}, {"ad_salt": "t" * 41}]
)
def test_vllm_xargs_is_an_allow_list(srv, xargs):
    """Before: ``vllm_xargs: {"kv_transfer_params": "x"}`` was an HTTP 500 with an empty message.
    Now every key but ad_lambda is refused with a message naming it, and the engine serves on."""
    res = post(srv, "plain", body(srv, 2, vllm_xargs=xargs))
    assert res.status_code in (400, 403) and next(iter(xargs)) in res.json()["error"]["message"], res.text
    assert post(srv, "plain", body(srv, 2)).status_code == 200


def test_priority_follows_the_tier(srv):
    res = post(srv, "plain", body(srv, 2, priority=-100))
    assert res.status_code == 403 and res.json()["error"]["param"] == "priority", res.text


def test_a_guessed_prefix_of_another_tenant_is_not_reused(srv):
    """Before: a second key's request reused 192 of the 200 tokens of another key's in-flight prompt
    in the proxy, visible on the open /metrics. Now each tenant's cache_salt (and the proxy's
    ad_salt) keeps its blocks its own: the neighbour prefills the whole prompt, while the owner's
    second request, the control, reuses it. Judged by the proxy's prefill counter (operator's key)."""
    prompt = ids(srv, " ".join(["Alice has 3 apples and buys 4 more pears."] * 12))[:160]
    assert len(prompt) == 160

    def prefill() -> float:
        return total(scrape(srv.base, srv.metrics_key), "antidistill_proxy_tokens_total", phase="prefill")

    def prefilled(tier: str) -> float:
        before = prefill()
        assert post(srv, tier, body(srv, 1, prompt=prompt)).status_code == 200
        return prefill() - before

    payload = body(srv, 64, prompt=prompt, stream=True)
    with httpx.stream("POST", srv.base + COMPLETIONS, json=payload, headers=srv.auth("plain"), timeout=120) as held:
        lines = held.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # the owner's prompt is in the cache
        probe, control = prefilled("neighbour"), prefilled("plain")
    assert probe >= len(prompt), f"the neighbour reused the owner's blocks ({probe} of {len(prompt)} prefilled)"
    assert control <= len(prompt) / 2, f"the control: the owner's own prompt is reused ({control} prefilled)"
    assert metrics_refused(srv), "and the counters are not open to a tenant"


def metrics_refused(srv: Server) -> bool:
    res = httpx.get(srv.base + "/metrics", headers=srv.auth("neighbour"), timeout=30)
    return res.status_code == 401 and "antidistill_proxy_tokens_total" not in res.text
