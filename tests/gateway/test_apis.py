"""The Responses and Messages APIs in the gateway's one parser, admission and stream count (no
server): what is forwarded, re-parsed by vLLM's own model and turned into sampling parameters the
way vLLM's route does, stays inside the tier's limits; each bypass a harvester would try first is
refused; a dropped stream is charged what it could have sent."""

from __future__ import annotations

import json
import warnings

import pytest
from antidistill.server.gateway.accounting import Exchange, count_output, settle
from antidistill.server.gateway.admission import admit
from antidistill.server.gateway.apis import api_for
from antidistill.server.gateway.apis.responses import Owner
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.request import parse
from antidistill.server.tiers import Caller, Tier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages
from vllm.exceptions import VLLMValidationError

RESPONSES, MESSAGES = "/v1/responses", "/v1/messages"
TIERS = {
    "free": Tier.model_validate({"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 64}),
    "scored": Tier.model_validate({"lambda": 2.0, "max_logprobs": 5, "max_tokens": 16}),
    "internal": Tier.model_validate({"lambda": 0.0, "max_lambda": 5.0}),
    "marked": Tier.model_validate({"lambda": 1.0, "watermark": "enforce"}),
}
USER = [{"role": "user", "content": "Alice has 3 apples"}]
BASES = {RESPONSES: {"input": "Alice has 3 apples"}, MESSAGES: {"model": "m", "messages": USER, "max_tokens": 8}}
KEY = b"k" * 32


def decide(route: str, body: dict, tier: str = "free", tenant: str = "key:a"):
    return admit(parse(route, json.dumps(body).encode()), tier, TIERS[tier], None, tenant_key=KEY, tenant=tenant)


def outcome(route: str, body: dict, tier: str = "free") -> tuple:
    """(status, param) of a refusal, or ("ok", the JSON object forwarded to vLLM)."""
    try:
        admitted = decide(route, {**BASES[route], **body}, tier)
    except Refusal as err:
        return err.status, err.param
    return "ok", json.loads(json.dumps(admitted.body()))


# --- the bypasses, as cases -------------------------------------------------------------------


@pytest.mark.parametrize("top", [0, 2, 20])
def test_responses_logprobs_count_only_with_their_include(top):
    include = {"include": ["message.output_text.logprobs"], "top_logprobs": top}
    assert outcome(RESPONSES, include) == (403, "logprobs")
    assert outcome(RESPONSES, include, "internal")[0] == "ok"
    assert outcome(RESPONSES, {"top_logprobs": top})[0] == "ok", "without the include vLLM computes none"
    if top > 5:
        assert outcome(RESPONSES, include, "scored") == (403, "logprobs")


def test_messages_cap_is_checked_never_written_and_decoys_change_nothing():
    assert outcome(MESSAGES, {"max_tokens": 65}) == (403, "max_tokens")
    status, forwarded = outcome(MESSAGES, {"max_tokens": 64, "logprobs": True, "top_logprobs": 5, "n": 4})
    assert status == "ok" and forwarded["max_tokens"] == 64
    assert not {"logprobs", "top_logprobs", "n", "max_completion_tokens"} & set(forwarded), "unknown fields dropped"


def test_responses_cap_is_written_when_absent():
    assert outcome(RESPONSES, {})[1]["max_output_tokens"] == 64
    assert outcome(RESPONSES, {"max_output_tokens": 65}) == (403, "max_output_tokens")
    assert outcome(RESPONSES, {"max_tokens": 10})[1]["max_output_tokens"] == 64, "chat's spelling is no escape"


@pytest.mark.parametrize("route", [RESPONSES, MESSAGES])
def test_router_fields_smuggled_arguments_and_lambda_floors_on_both_apis(route):
    for name in ("kv_transfer_params", "ec_transfer_params"):
        assert outcome(route, {name: {"remote_host": "10.0.0.1"}}, "internal") == (403, name)
    assert outcome(route, {"vllm_xargs": {"ad_lambda": 0}})[0] == 403
    assert outcome(route, {"metadata": {"ad_lambda": "0"}})[0] == 403
    assert outcome(route, {"vllm_xargs": {"ad_profile": "code"}})[0] == 403
    assert outcome(route, {"vllm_xargs": {"kv_transfer_params": 1}})[0] == 400
    assert outcome(route, {"vllm_xargs": {"ad_lambda": 5}})[1]["vllm_xargs"]["ad_lambda"] == 5


@pytest.mark.parametrize("route", [RESPONSES, MESSAGES])
def test_watermark_enforce_overrides_the_clients_opt_out(route):
    assert outcome(route, {"watermarking": False}, "marked")[1]["watermarking"] is True
    assert outcome(route, {}, "marked")[1]["watermarking"] is True
    assert outcome(route, {"watermarking": False}, "free")[1]["watermarking"] is False, "allow: as sent"


@pytest.mark.parametrize("route", [RESPONSES, MESSAGES])
def test_the_tenant_salt_replaces_the_clients_cache_salt(route):
    mine = outcome(route, {"cache_salt": "guess"})[1]["cache_salt"]
    theirs = decide(route, {**BASES[route], "cache_salt": "guess"}, tenant="key:b").body()["cache_salt"]
    assert mine != "guess" and mine != theirs, "a guessed salt never reaches another tenant's cache"


def test_stored_responses_belong_to_their_tenant():
    admitted = decide(RESPONSES, BASES[RESPONSES], tenant="key:a")
    rid = admitted.body()["request_id"]
    mine, theirs = Owner(KEY, "key:a"), Owner(KEY, "key:b")
    assert mine.owns(rid) and not theirs.owns(rid)
    assert not Owner(b"x" * 32, "key:a").owns(rid), "the tag is keyed: it cannot be computed from the tenant's name"
    for forged in (rid[:-1], rid + "0", "resp_" + "0" * 48, rid.replace("resp_", "msg_"), ""):
        assert not mine.owns(forged)
    assert outcome(RESPONSES, {"request_id": rid}) == (400, "request_id")
    with pytest.raises(Refusal) as err:
        decide(RESPONSES, {**BASES[RESPONSES], "previous_response_id": rid}, tenant="key:b")
    assert err.value.status == 404 and "not found" in err.value.message
    assert (
        decide(
            RESPONSES, {**BASES[RESPONSES], "previous_response_id": rid}, tenant="key:a"
        ).request.previous_response_id
        == rid
    )
    assert outcome(RESPONSES, {"background": True}) == (403, "background")
    assert outcome(RESPONSES, {"background": True}, "internal")[0] == "ok"


# --- what is forwarded is what was decided ----------------------------------------------------

ints = st.integers(-1, 80)
XARGS = st.sampled_from([{}, {"x": 1}, {"ad_lambda": 3}, {"ad_lambda": 0}, {"ad_lambda": 2.5}])
FIELDS = {
    RESPONSES: {
        "max_output_tokens": st.one_of(st.none(), ints),
        "top_logprobs": st.integers(0, 8),
        "include": st.sampled_from([None, [], ["message.output_text.logprobs"], ["reasoning.encrypted_content"]]),
        "stream": st.booleans(),
        "store": st.booleans(),
        "temperature": st.sampled_from([0, 0.5, 1]),
        "vllm_xargs": XARGS,
        "watermarking": st.sampled_from([None, False, True]),
        "max_tokens": ints,  # decoys: other APIs' spellings
        "logprobs": st.booleans(),
        "prompt_logprobs": st.integers(0, 5),
        "messages": st.just([]),
    },
    MESSAGES: {
        "max_tokens": st.integers(1, 80),
        "stream": st.booleans(),
        "temperature": st.sampled_from([0, 0.5, 1]),
        "top_k": st.sampled_from([None, 1, 5]),
        "vllm_xargs": XARGS,
        "watermarking": st.sampled_from([None, False, True]),
        "max_completion_tokens": ints,
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 5),
        "prompt_logprobs": st.integers(0, 5),
        "input": st.just("decoy"),
    },
}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, dict]:
    route = draw(st.sampled_from([RESPONSES, MESSAGES]))
    return route, {**BASES[route], **draw(st.fixed_dictionaries({}, optional=FIELDS[route]))}


def engine_params(route: str, request):
    """The sampling parameters vLLM's route builds from the forwarded request."""
    if route == MESSAGES:
        chat = AnthropicServingMessages.to_chat_completion_request(request)
        return chat.to_sampling_params(chat.max_completion_tokens or 8, {})
    return request.to_sampling_params(512, {})


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(case=bodies(), tier=st.sampled_from(sorted(TIERS)))
def test_forwarded_request_is_what_was_decided(case, tier):
    route, body = case
    try:
        admitted = decide(route, body, tier)
    except Refusal as err:
        assert err.status in (400, 403), err.message
        return
    forwarded = json.loads(json.dumps(admitted.body()))
    model = api_for(route).model
    assert set(forwarded) <= set(model.model_fields), set(forwarded) - set(model.model_fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            seen = model.model_validate(forwarded)
            params = engine_params(route, seen)
        except (ValueError, VLLMValidationError):
            return  # vLLM refuses it (400) before it reaches the engine
    assert seen.model_dump(mode="json") == admitted.request.model_dump(mode="json")
    allowed = TIERS[tier].side_channels(admitted.lam, escalated=False)
    if params.logprobs is not None:
        assert allowed.max_logprobs > 0 and 0 <= params.logprobs <= allowed.max_logprobs
    assert params.prompt_logprobs is None
    cap = TIERS[tier].max_tokens
    assert cap is None or params.max_tokens <= cap
    assert params.extra_args["ad_lambda"] == admitted.lam
    if TIERS[tier].watermark == "enforce":
        assert params.watermarking is True


# --- a dropped stream is charged what it could have sent --------------------------------------


def exchange(route: str, body: dict) -> Exchange:
    ex = Exchange(Caller("a", "free", TIERS["free"]), route, 0.0, status=200)
    ex.decision = decide(route, {**BASES[route], **body, "stream": True})
    return ex


RESPONSES_STREAM = [
    {"type": "response.created", "sequence_number": 0, "response": {"usage": None}},
    *({"type": "response.output_text.delta", "sequence_number": i, "delta": "x"} for i in range(1, 4)),
    {
        "type": "response.completed",
        "sequence_number": 4,
        "response": {"usage": {"input_tokens": 9, "output_tokens": 5}},
    },
]
MESSAGES_STREAM = [
    {"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 0}}},
    *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}} for _ in range(3)),
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"input_tokens": 9, "output_tokens": 5}},
]


def sse(events: list[dict]) -> list[bytes]:
    return [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events]


@pytest.mark.parametrize("route,stream", [(RESPONSES, RESPONSES_STREAM), (MESSAGES, MESSAGES_STREAM)])
def test_a_finished_stream_is_counted_exactly(route, stream):
    ex = exchange(route, {"max_output_tokens": 40} if route == RESPONSES else {"max_tokens": 40})
    sent = b"".join(count_output(ex, chunk, i == len(stream) - 1) for i, chunk in enumerate(sse(stream)))
    assert sent == b"".join(sse(stream)), "forwarded unchanged"
    settle(ex)
    assert (ex.prompt_tokens, ex.completion_tokens, ex.estimated) == (9, 5, False)


@pytest.mark.parametrize("route,stream", [(RESPONSES, RESPONSES_STREAM), (MESSAGES, MESSAGES_STREAM)])
def test_a_stream_dropped_before_its_usage_is_charged_its_budget(route, stream):
    ex = exchange(route, {"max_output_tokens": 40} if route == RESPONSES else {"max_tokens": 40})
    for chunk in sse(stream[:3]):  # two deltas, then the client leaves
        count_output(ex, chunk, False)
    assert ex.completion_tokens == 2, "a lower bound while it runs"
    settle(ex)
    assert ex.completion_tokens == 40 and ex.estimated
    quiet = exchange(route, {"max_output_tokens": 40} if route == RESPONSES else {"max_tokens": 40})
    count_output(quiet, sse(stream[:1])[0], False)
    settle(quiet)
    assert quiet.completion_tokens == 0 and not quiet.estimated, "nothing was sent: nothing to charge"
