"""The Responses API and the Anthropic Messages API through `antidistill serve` (a real process on the
tiny models, vLLM's response store on), driven by the stock ``openai`` and ``anthropic`` SDKs.
Protection is judged by the tokens: each route's greedy output, streamed and not, equals the
independent HF reference sampler at the tier's λ on the prompt vLLM's chat template builds."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest
from antidistill.benchmarks.tiny.reference import LOGPROB_NOISE, ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS
from antidistill.proxy_worker.core.gradient_file import read_delta_scale

from tests.helpers import Server, audit_lines, audit_until, engine_fixture, scrape, tiny_server, total

TIERS = {
    "free": {"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 64},
    "internal": {"lambda": 0.0, "max_lambda": 5.0},
    "portable": {"strength": 50.0, "min_strength": 25.0, "max_strength": 75.0},
}
QUESTION = "Alice has 7 apples and buys 15 more. How many apples does she have?"
TOKENS = 12


@engine_fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Server]:
    env = {"VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    with tiny_server(tmp_path_factory.mktemp("apis"), TIERS, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def sampler(served) -> ReferenceSampler:
    theta, grad = served.models.theta_and_grad("math")
    return ReferenceSampler(served.models.teacher, served.models.proxy, theta, grad, EPSILONS["math"])


def openai_client(srv: Server, tier: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base + "/v1", api_key=srv.keys[tier], max_retries=0)


def anthropic_client(srv: Server, tier: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=srv.base, api_key=srv.keys[tier], max_retries=0)


@pytest.fixture(scope="module")
def prompt(served) -> list[int]:
    """The question as vLLM's chat template renders it (vLLM's own renderer: the chat route, λ = 0)."""
    body = {"model": served.model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 1}
    res = httpx.post(
        served.base + "/v1/chat/completions",
        json={**body, "return_token_ids": True},
        headers=served.auth("internal"),
        timeout=60,
    )
    assert res.status_code == 200, res.text
    return res.json()["prompt_token_ids"]


def assert_reference(srv: Server, sampler: ReferenceSampler, prompt: list[int], lam: float, text: str) -> None:
    """``text`` is the reference's greedy output at ``lam``, to its first EOS, as text (these APIs
    return no token ids); only a near-tie may part them, and nothing after it is compared."""
    tok = srv.models.tokenizer
    expected, margins = sampler.greedy(prompt, lam, TOKENS)
    if tok.eos_token_id in expected:
        expected = expected[: expected.index(tok.eos_token_id)]
    full = tok.decode(expected, skip_special_tokens=True)
    held_back = full.startswith(text) and set(full[len(text) :]) <= {"\ufffd"}  # an unfinished UTF-8 character
    if not held_back:
        parted = next(k for k in range(len(expected)) if not text.startswith(tok.decode(expected[: k + 1])))
        assert margins[parted] < 2 * LOGPROB_NOISE, (text, tok.decode(expected), parted)
    clean = sampler.generate(prompt, 0.0, TOKENS)
    assert lam == 0 or clean[: len(expected)] != expected, "λ must change the tokens for this to test it"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tier,lam", [("free", 3.0), ("internal", 0.0)])
def test_responses_api_is_served_at_the_tiers_lambda(served, sampler, prompt, tier, lam, stream):
    request = dict(model=served.model, input=QUESTION, max_output_tokens=TOKENS, temperature=0)
    client = openai_client(served, tier)
    if stream:
        events = list(client.responses.create(**request, stream=True))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].type == "response.completed" and events[-1].response.usage.output_tokens >= 1
    else:
        raw = client.responses.with_raw_response.create(**request)
        assert float(raw.headers["x-antidistillation-lambda"]) == lam
        text = raw.parse().output_text
    assert_reference(served, sampler, prompt, lam, text)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tier,lam", [("free", 3.0), ("internal", 0.0)])
def test_messages_api_is_served_at_the_tiers_lambda(served, sampler, prompt, tier, lam, stream):
    messages = [{"role": "user", "content": QUESTION}]
    request = dict(model=served.model, messages=messages, max_tokens=TOKENS, extra_body={"temperature": 0})
    client = anthropic_client(served, tier)
    if stream:
        with client.messages.stream(**request) as events:
            text = "".join(events.text_stream)
            final = events.get_final_message()
        assert final.usage.output_tokens >= 1
    else:
        raw = client.messages.with_raw_response.create(**request)
        assert float(raw.headers["x-antidistillation-lambda"]) == lam
        text = "".join(block.text for block in raw.parse().content if block.type == "text")
    assert_reference(served, sampler, prompt, lam, text)


def test_a_floor_tier_refuses_lambda_zero_on_every_api(served):
    zero = {"vllm_xargs": {"ad_lambda": 0}}
    with pytest.raises(openai.PermissionDeniedError, match="allowed range"):
        openai_client(served, "free").responses.create(model=served.model, input="x", extra_body=zero)
    with pytest.raises(anthropic.PermissionDeniedError, match="allowed range"):
        anthropic_client(served, "free").messages.create(
            model=served.model, messages=[{"role": "user", "content": "x"}], max_tokens=4, extra_body=zero
        )
    with pytest.raises(anthropic.PermissionDeniedError, match="max_tokens"):
        anthropic_client(served, "free").messages.create(
            model=served.model, messages=[{"role": "user", "content": "x"}], max_tokens=65
        )


def test_responses_logprobs_are_a_side_channel_closed_on_protected_tiers(served):
    asks = dict(model=served.model, input=QUESTION, max_output_tokens=4, temperature=0)
    logprobs = dict(include=["message.output_text.logprobs"], top_logprobs=2)
    for extra in (logprobs, {**logprobs, "top_logprobs": 0}):
        with pytest.raises(openai.PermissionDeniedError, match="logprobs"):
            openai_client(served, "free").responses.create(**asks, **extra)
    open_tier = openai_client(served, "internal").responses.create(**asks, **logprobs)
    content = open_tier.output[-1].content[0]
    assert content.logprobs and len(content.logprobs[0].top_logprobs) == 2, "λ = 0 may see them: the check is real"
    quiet = openai_client(served, "free").responses.create(**asks, top_logprobs=5)  # no include: none computed
    assert not quiet.output[-1].content[0].logprobs


def test_messages_carry_no_logprobs_in_any_spelling(served):
    body = {
        "model": served.model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 4,
        "logprobs": True,
        "top_logprobs": 5,
        "prompt_logprobs": 5,
    }
    res = httpx.post(served.base + "/v1/messages", json=body, headers=served.auth("free"), timeout=60)
    assert res.status_code == 200, res.text
    assert "logprobs" not in res.text and res.headers["x-antidistillation-lambda"] == "3"


def test_stored_responses_are_their_owners_only(served):
    owner, other = openai_client(served, "free"), openai_client(served, "internal")
    first = owner.responses.create(model=served.model, input=QUESTION, max_output_tokens=4, store=True)
    assert owner.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(
            model=served.model, input="and then?", max_output_tokens=4, previous_response_id=first.id
        )
    with pytest.raises(openai.NotFoundError):
        other.responses.cancel(first.id)
    follow = owner.responses.create(
        model=served.model, input="and then?", max_output_tokens=4, previous_response_id=first.id
    )
    assert follow.id != first.id and follow.output_text is not None
    with pytest.raises(openai.BadRequestError, match="request_id"):
        other.responses.create(model=served.model, input="x", max_output_tokens=2, extra_body={"request_id": first.id})
    with pytest.raises(openai.PermissionDeniedError, match="background"):
        owner.responses.create(model=served.model, input="x", max_output_tokens=2, background=True)


def test_count_tokens_needs_a_key_and_counts(served):
    client = anthropic_client(served, "free")
    counted = client.messages.count_tokens(model=served.model, messages=[{"role": "user", "content": QUESTION}])
    assert counted.input_tokens > 5
    res = httpx.post(served.base + "/v1/messages/count_tokens", json={"model": served.model, "messages": []})
    assert (
        res.status_code == 401
        and res.json()["type"] == "error"
        and res.json()["error"]["type"] == "authentication_error"
    )


def test_strength_requests_on_every_api(served):
    scale = read_delta_scale(served.models.gradients["math"])
    strength = {"X-Antidistillation-Strength": "60"}
    raw = openai_client(served, "portable").responses.with_raw_response.create(
        model=served.model, input="x", max_output_tokens=2, extra_headers=strength
    )
    assert float(raw.headers["x-antidistillation-lambda"]) == pytest.approx(60 / scale, rel=1e-5)
    assert float(raw.headers["x-antidistillation-strength"]) == pytest.approx(60, rel=1e-3)
    with pytest.raises(anthropic.PermissionDeniedError, match=r"strength"):
        anthropic_client(served, "portable").messages.create(
            model=served.model,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=2,
            extra_body={"vllm_xargs": {"ad_strength": 90}},
        )
    with pytest.raises(openai.BadRequestError, match="disagree"):
        openai_client(served, "portable").responses.create(
            model=served.model,
            input="x",
            max_output_tokens=2,
            extra_headers=strength,
            extra_body={"vllm_xargs": {"ad_lambda": 1.0}},
        )


def test_audit_and_metrics_name_each_api(served):
    counted = {
        api: total(scrape(served.base, served.metrics_key), "antidistill_requests_total", api=api)
        for api in ("responses", "messages")
    }
    openai_client(served, "free").responses.create(model=served.model, input="x", max_output_tokens=2)
    anthropic_client(served, "free").messages.create(
        model=served.model, messages=[{"role": "user", "content": "x"}], max_tokens=2
    )
    lines = audit_until(served, lambda lines: any(x.get("api") == "responses" for x in lines))
    seen = {x["api"] for x in lines}
    assert {"responses", "messages"} <= seen, seen
    answered = [x for x in lines if x["api"] == "responses" and x["status"] == 200]
    assert all(x["completion_tokens"] >= 1 and not x["completion_estimated"] for x in answered), answered
    after = scrape(served.base, served.metrics_key)
    for api in ("responses", "messages"):
        assert total(after, "antidistill_requests_total", api=api, tier="free", status="200") >= 1
        assert total(after, "antidistill_requests_total", api=api) >= counted[api] + 1, api


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_a_stream_dropped_early_is_charged_its_whole_budget(served, api):
    """The harvester's first move against a token budget: read a few events, then hang up before
    the usage event. These streams carry no running count, so the drop is charged the output limit."""
    budget = 48
    if api == "responses":
        body = {
            "model": served.model,
            "input": QUESTION,
            "max_output_tokens": budget,
            "stream": True,
            "ignore_eos": True,
        }
    else:
        messages = [{"role": "user", "content": QUESTION}]
        body = {"model": served.model, "messages": messages, "max_tokens": budget, "stream": True}
    before = len(audit_lines(served))
    with httpx.stream("POST", f"{served.base}/v1/{api}", json=body, headers=served.auth("free"), timeout=60) as res:
        assert res.status_code == 200
        deltas = 0
        for line in res.iter_lines():
            deltas += line.startswith("data:") and "delta" in line
            if deltas >= 3:
                break
    lines = audit_until(served, lambda lines: len(lines) > before)[before:]
    [line] = [x for x in lines if x["api"] == api]
    assert line["completion_estimated"] is True and line["completion_tokens"] == budget, line
