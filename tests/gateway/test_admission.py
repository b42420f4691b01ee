"""The gateway's one parser and its pure admission function (no server): the confirmed bypasses
as cases, and properties over generated bodies — what the gateway forwards, re-parsed by vLLM's
own model, is exactly what it decided on, and a refusal does not depend on how values are spelled."""

from __future__ import annotations

import json
import warnings

import pytest
from antidistill.server.gateway.admission import admit
from antidistill.server.gateway.apis import api_for
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.request import canonical, max_body_bytes, parse
from antidistill.server.tiers import Tier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import RequestOutputKind

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
TIERS = {
    "free": Tier.model_validate({"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 64}),
    "scored": Tier.model_validate({"lambda": 2.0, "max_logprobs": 5, "max_tokens": 16}),
    "internal": Tier.model_validate({"lambda": 0.0, "max_lambda": 5.0}),
    "counted": Tier.model_validate({"lambda": 0.0, "max_logprobs": 2, "allow_prompt_logprobs": False}),
}
MESSAGES = [{"role": "user", "content": "Alice has 3 apples"}]


def outcome(route: str, body: dict, tier: str = "free") -> tuple:
    """(status, param) of a refusal, or ("ok", the JSON object forwarded to vLLM)."""
    try:
        admitted = admit(parse(route, json.dumps(body).encode()), tier, TIERS[tier], None)
    except Refusal as err:
        return err.status, err.param
    return "ok", json.loads(json.dumps(admitted.body()))


@pytest.mark.parametrize("spelling", [False, True, 0, 0.0, 1, "false", "0"])
@pytest.mark.parametrize("echo", [False, True])
def test_completion_logprobs_however_spelled(spelling, echo):
    """``"logprobs": false`` reached vLLM as 0 (sampled logprobs; with echo, raw prompt logprobs);
    a decoy ``messages`` made the gateway apply the chat rules."""
    body = {"prompt": "x", "logprobs": spelling, "echo": echo, "messages": [], "top_logprobs": 0}
    status, _ = outcome(COMPLETIONS, body)
    assert status in (400, 403), (body, status)  # 400: vLLM itself refuses a string count


@pytest.mark.parametrize("spelling", [True, 1, "true", "1", "yes"])
def test_chat_logprobs_and_echo_however_spelled(spelling):
    for body in ({"logprobs": spelling}, {"echo": spelling}, {"logprobs": spelling, "prompt": "x", "logprobs_x": 0}):
        status, _ = outcome(CHAT, {"messages": MESSAGES, **body})
        assert status == 403, body
    assert outcome(CHAT, {"messages": MESSAGES, "echo": True}, "internal")[0] == "ok"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [65, "65", 65.0, "200", 200.0])
def test_caps_however_spelled(field, value):
    assert outcome(CHAT, {"messages": MESSAGES, field: value}) == (403, field)
    if field == "max_tokens":
        assert outcome(COMPLETIONS, {"prompt": "x", field: value}) == (403, field)
    ok, body = outcome(CHAT, {"messages": MESSAGES, field: str(64)})
    assert ok == "ok" and body[field] == 64


def test_route_decides_the_kind():
    assert outcome(COMPLETIONS, {"prompt": "x", "messages": [], "logprobs": 0}) == (403, "logprobs")
    assert outcome(CHAT, {"messages": MESSAGES, "prompt": "x", "logprobs": 0})[0] == "ok"  # chat: 0 is False
    ok, body = outcome(COMPLETIONS, {"prompt": "x", "messages": MESSAGES, "max_completion_tokens": 999})
    assert ok == "ok" and "messages" not in body and "max_completion_tokens" not in body, body
    assert outcome(CHAT, {"prompt": "x"}) == (400, "messages")


@pytest.mark.parametrize(("off", "on"), [(False, True), (0, 1), ("false", "true"), ("0", "1"), ("no", "yes")])
def test_stream_flag_however_spelled(off, on):
    for route, base in ((COMPLETIONS, {"prompt": "x"}), (CHAT, {"messages": MESSAGES})):
        plain = admit(parse(route, json.dumps({**base, "stream": off}).encode()), "free", TIERS["free"], None)
        assert plain.stream is False and canonical(plain.request)["stream"] is False
        stream = admit(parse(route, json.dumps({**base, "stream": on}).encode()), "free", TIERS["free"], None)
        assert stream.stream and stream.hide_usage
        assert canonical(stream.request)["stream_options"]["include_usage"] is True


def test_invalid_bodies_are_vllms_400():
    cases = [
        (COMPLETIONS, b"", None),
        (COMPLETIONS, b"[1]", None),
        (COMPLETIONS, b'{"prompt": "x", "max_tokens": "lots"}', "max_tokens"),
        (COMPLETIONS, b'{"prompt": "x", "logprobs": "2"}', "logprobs"),
        (COMPLETIONS, b'{"prompt": "x", "vllm_xargs": [1]}', "vllm_xargs"),
        (COMPLETIONS, b'{"prompt": "x", "structured_outputs": [1]}', "structured_outputs"),
        (CHAT, b'{"messages": "hi"}', "messages"),
        (CHAT, b'{"messages": [], "stream_options": {"include_usage": true}}', "stream_options"),
        # found by fuzzing: vLLM 0.32's tool_choice validator indexes tools[i]["function"]["name"] (KeyError → 500)
        (
            CHAT,
            b'{"messages": [], "tools": [{"type": "function", "function": {}}],'
            b' "tool_choice": {"type": "function", "function": {"name": "f"}}}',
            None,
        ),
    ]
    for route, raw, param in cases:
        with pytest.raises(Refusal) as err:
            parse(route, raw)
        assert err.value.status == 400 and err.value.param == param, (raw, err.value.message, err.value.param)
        assert "\n" not in err.value.message


def test_body_limit_default_and_override():
    assert max_body_bytes(256) == 64 * 256 + (1 << 20)
    assert max_body_bytes(256, 1000) == 1000


# --- properties -------------------------------------------------------------------------------

ints = st.integers(-1, 80)


def spellings(value: object) -> st.SearchStrategy:
    """Ways a client can write ``value`` that vLLM's lax parsing reads as the same value."""
    if isinstance(value, bool):
        return st.sampled_from([value, int(value), str(value).lower(), "1" if value else "0", "on" if value else "off"])
    if isinstance(value, int):
        return st.sampled_from([value, float(value), str(value)])
    return st.just(value)


COMMON = {
    "max_tokens": st.one_of(st.none(), ints),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "echo": st.booleans(),
    "prompt_logprobs": st.one_of(st.none(), st.integers(-1, 6)),
    "logprob_token_ids": st.lists(st.integers(0, 50), max_size=8),
    "use_beam_search": st.booleans(),
    "temperature": st.sampled_from([0, 0.5, 1]),
    "vllm_xargs": st.sampled_from([{}, {"x": 1}, {"ad_lambda": 3}, {"ad_lambda": 0}, {"ad_lambda": 2.5, "y": "z"}]),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
}
FIELDS = {
    COMPLETIONS: {
        **COMMON,
        "logprobs": st.one_of(st.none(), st.integers(-1, 8)),
        "messages": st.just([]),  # decoys: chat fields on the completions route
        "top_logprobs": st.integers(0, 5),
        "max_completion_tokens": ints,
    },
    CHAT: {
        **COMMON,
        "logprobs": st.booleans(),
        "top_logprobs": st.one_of(st.none(), st.integers(-1, 8)),
        "max_completion_tokens": st.one_of(st.none(), ints),
        "prompt": st.just("decoy"),
        "prompt_embeds": st.just("AAAA"),
    },
}
BASES = {COMPLETIONS: {"prompt": "The sum of 12"}, CHAT: {"messages": MESSAGES}}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, dict, dict]:
    """(route, body, the same body with values spelled differently)."""
    route = draw(st.sampled_from([COMPLETIONS, CHAT]))
    typed = draw(st.fixed_dictionaries({}, optional=FIELDS[route]))
    respelled = {k: draw(spellings(v)) for k, v in typed.items()}
    return route, {**BASES[route], **typed}, {**BASES[route], **respelled}


def same_request(a: object, b: object) -> bool:
    """Equal as vLLM reads them (request_id: a fresh uuid per parse unless the client sets one)."""
    keep = {"request_id"}
    return a.model_dump(mode="json", exclude=keep) == b.model_dump(mode="json", exclude=keep)


PROPERTY = settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@PROPERTY
@given(case=bodies(), tier=st.sampled_from(sorted(TIERS)))
def test_forwarded_request_is_what_was_decided(case, tier):
    """Re-parsed by vLLM's model, the forwarded JSON equals the admitted request, carries no field
    vLLM's model does not know, and turns into sampling parameters inside the tier's limits."""
    route, body, _ = case
    try:
        admitted = admit(parse(route, json.dumps(body).encode()), tier, TIERS[tier], None)
    except Refusal as err:
        assert err.status in (400, 403, 429), err.message
        return
    forwarded = json.loads(json.dumps(admitted.body()))
    model = api_for(route).model
    assert set(forwarded) <= set(model.model_fields), set(forwarded) - set(model.model_fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            seen = model.model_validate(forwarded)
        except VLLMValidationError:
            return  # vLLM's raw-body checks refuse the canonical form: refused, not served
        assert same_request(seen, admitted.request)
        assert bool(seen.stream) == admitted.stream
        assert seen.vllm_xargs["ad_lambda"] == admitted.lam
        limit = TIERS[tier].max_tokens
        requested = seen.max_tokens
        if isinstance(seen, ChatCompletionRequest) and seen.max_completion_tokens is not None:
            requested = seen.max_completion_tokens
        if limit is not None:
            assert requested is not None and requested <= limit
        if seen.use_beam_search:
            assert admitted.lam == 0
            return
        try:
            params = seen.to_sampling_params(requested or 8, {})
        except (ValueError, VLLMValidationError):
            return  # vLLM refuses it (400) before it reaches the engine
    t = TIERS[tier].side_channels(admitted.lam, escalated=False)
    if params.logprobs is not None:
        assert t.max_logprobs > 0 and 0 <= params.logprobs <= t.max_logprobs
    assert len(params.logprob_token_ids or []) <= t.max_logprobs
    if params.prompt_logprobs is not None:
        assert t.prompt_logprobs and 0 <= params.prompt_logprobs <= t.max_logprobs
    assert (params.output_kind == RequestOutputKind.DELTA) == admitted.stream
    assert params.extra_args["ad_lambda"] == admitted.lam


@PROPERTY
@given(case=bodies(), tier=st.sampled_from(sorted(TIERS)))
def test_refusal_does_not_depend_on_spelling(case, tier):
    """A body and its re-spelled twin: when vLLM reads both as the same request, the gateway
    decides the same; a refused body is refused however its values are written."""
    route, body, respelled = case
    first, second = outcome(route, body, tier), outcome(route, respelled, tier)
    if first[0] != "ok":
        assert second[0] != "ok", (body, respelled, first, second)
    if first[0] == "ok" and second[0] == "ok":
        assert first == second


@pytest.mark.parametrize("route,base", [(COMPLETIONS, {"prompt": "x"}), (CHAT, {"messages": MESSAGES})])
def test_router_only_fields_and_unparseable_lambdas_are_refused(route, base):
    """KV-transfer parameters reach the engine's connectors; a 400-digit λ overflowed float() (a 500)."""
    for name in ("kv_transfer_params", "ec_transfer_params"):
        assert outcome(route, {**base, name: {"remote_host": "10.0.0.1"}}, "internal") == (403, name)
    huge = int("9" * 400)
    for lam in (huge, -huge):
        assert outcome(route, {**base, "vllm_xargs": {"ad_lambda": lam}}) == (400, "vllm_xargs.ad_lambda")
