"""Admission, in-process (tests/gateway/asgi.py): which refusal wins when a request has several
faults (credentials, then the body, then the tier's policy, then its limits), the limits (429 with
Retry-After) and escalation (an escalated key or account gets the escalation's λ as its floor), the
client's ``vllm_xargs`` (``ad_lambda`` alone), and the body vLLM is sent: the canonical request with
the decided λ, the ticket the guard watches and the tenant's cache salt."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from antidistill.proxy_worker.runtime.settings import MAX_TICKET

from tests.gateway.asgi import CHAT, COMPLETIONS, Gateway, chat, completion, error, open_gateway

ESCALATION = {"tokens_per_hour": 30, "lambda": 4.0, "decay_minutes": 10}
TIERS = {
    "free": {"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 64},
    "ordered": {"lambda": 1.0, "rpm": 2},
    "paced": {"lambda": 1.0, "rpm": 3},
    "metered": {"lambda": 1.0, "tpm": 100, "max_tokens": 40},
    "single": {"lambda": 1.0, "max_concurrent": 1},
    "watched": {"lambda": 0.5, "max_lambda": 1.0, "max_logprobs": 2, "escalation": ESCALATION},
    "plain": {"lambda": 1.0},
    "internal": {"lambda": 0.0},
}
ACCOUNTS = {"acme": {"escalation": {"tokens_per_hour": 30, "lambda": 2.0}}}
KEYS = {
    **{name: {"tier": name} for name in TIERS},
    "acme-a": {"tier": "plain", "account": "acme"},
    "acme-b": {"tier": "plain", "account": "acme"},
}
LAMBDA = "x-antidistillation-lambda"
HUGE = [(b"content-type", b"application/json"), (b"content-length", b"20000000")]
PART = [{"type": "http.request", "body": b'{"prompt": "x", "ad_profile": "code"', "more_body": True}]


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[Gateway]:
    with open_gateway(tmp_path_factory.mktemp("admission"), TIERS, KEYS, accounts=ACCOUNTS) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def fresh(gw: Gateway) -> None:
    gw.fake.reset()


def status_param(res) -> tuple[int, str | None]:
    return res.status_code, (error(res)["param"] if res.status_code >= 400 else None)


def retry_after(res) -> int:
    value = int(res.headers["retry-after"])
    assert 1 <= value <= 60, value
    return value


# --- which refusal wins ------------------------------------------------------------------------


def test_credentials_are_checked_before_the_body(gw):
    for headers, status, needle in [
        ([], 401, "missing API key"),
        ([(b"authorization", b"Bearer ad-not-a-key")], 401, "invalid or revoked"),
        ([(b"authorization", b"Basic abc")], 401, "unsupported authorization scheme"),
        ([(b"authorization", f"Bearer {gw.keys['free']}".encode())] * 2, 400, "2 Authorization headers"),
    ]:
        out = gw.raw(COMPLETIONS, PART, [*HUGE, *headers])
        assert out.status == status and needle in out.json()["error"]["message"], (headers, out.body)
        assert out.reads == 0, "the body of an unauthenticated request is never read"
    res = gw.post(None, b'{"prompt": "x",', headers=[("authorization", "Bearer ad-not-a-key")])
    assert res.status_code == 401
    assert gw.fake.received == []


def test_the_body_is_checked_before_the_policy(gw):
    out = gw.raw(COMPLETIONS, PART, HUGE, name="free")  # too large, and smuggles ad_profile
    assert out.status == 413 and out.reads == 0
    cases = [
        (b'{"prompt": "x", "ad_profile": "code",', [], (400, None)),  # not JSON, and smuggles ad_profile
        (b'{"prompt": "x", "max_tokens": "lots"}', [("x-antidistillation-lambda", "99")], (400, "max_tokens")),
        (b'{"prompt": "x", "max_tokens": "lots", "ad_lambda": 5}', [], (400, "max_tokens")),
        (b'{"prompt": "x", "max_tokens": "lots", "vllm_xargs": {"ad_mode": "permutation"}}', [], (400, "max_tokens")),
        (b'{"messages": "hi", "priority": 9}', [], (400, "messages")),
    ]
    for raw, headers, expected in cases:
        path = CHAT if b"messages" in raw else COMPLETIONS
        res = gw.request("POST", path, "free", body=raw, headers=headers)
        assert status_param(res) == expected, (raw, res.text)
        assert gw.last_audit()["lambda"] is None, "refused before any decision"
    assert gw.fake.received == []


def test_the_policy_is_checked_before_the_limits(gw):
    """``ordered`` allows 2 requests a minute: refusals by policy do not use them up, and once they
    are used up a request the policy refuses is still refused by the policy."""
    bad = [
        completion(vllm_xargs={"ad_lambda": 99}),
        completion(vllm_xargs={"ad_profile": "code"}),
        completion(ad_lambda=1.0),
        completion(logprobs=1),  # a protected request gets no logprobs by default
    ]
    expected = [(403, "ad_lambda"), (403, "ad_profile"), (403, "ad_lambda"), (403, "logprobs")]
    for _ in range(2):
        assert [status_param(gw.post("ordered", body)) for body in bad] == expected
    assert [gw.post("ordered", completion()).status_code for _ in range(2)] == [200, 200]
    limited = gw.post("ordered", completion())
    assert limited.status_code == 429 and error(limited)["type"] == "rate_limit_error"
    assert "more than 2 requests per minute" in error(limited)["message"]
    assert 55 <= retry_after(limited) <= 60
    assert [status_param(gw.post("ordered", body)) for body in bad] == expected, "policy first, even when limited"
    assert len(gw.fake.generated()) == 2
    assert gw.post("free", completion()).status_code == 200, "another key's budget is its own"


# --- limits ------------------------------------------------------------------------------------


def test_rpm_counts_sequences(gw):
    """A request counts as prompts × n against rpm (3 here)."""
    assert gw.post("paced", completion(n=2)).status_code == 200
    over = gw.post("paced", completion(n=2))
    assert over.status_code == 429 and "this request runs 2 sequences" in error(over)["message"]
    retry_after(over)
    assert gw.post("paced", completion(prompt=["a", "b"])).status_code == 429, "two prompts are two sequences"
    assert gw.post("paced", completion()).status_code == 200
    assert gw.post("paced", completion()).status_code == 429
    assert len(gw.fake.generated()) == 2


def test_tpm_counts_prompt_and_output_limit(gw):
    """tpm 100: a one-token prompt with max_tokens 40 is counted as 41, before it runs."""
    for _ in range(2):
        assert gw.post("metered", completion(prompt="x", max_tokens=40)).status_code == 200
    over = gw.post("metered", completion(prompt="x", max_tokens=40))
    assert over.status_code == 429 and "(82 used, 41 asked)" in error(over)["message"], error(over)
    retry_after(over)
    assert gw.post("metered", completion(prompt="x", max_tokens=17)).status_code == 200, "exactly at the limit"
    assert gw.post("metered", completion(prompt="x", max_tokens=1)).status_code == 429
    assert len(gw.fake.generated()) == 3


def test_max_concurrent_counts_requests_in_flight(gw):
    async def scenario() -> tuple:
        held, gw.fake.hold, gw.fake.arrived = asyncio.Event(), None, asyncio.Event()
        gw.fake.hold = held
        first = asyncio.get_running_loop().create_task(gw.arequest("POST", COMPLETIONS, "single", body=completion()))
        await gw.fake.arrived.wait()
        gw.fake.hold = None  # only the first request is held
        second = await gw.arequest("POST", COMPLETIONS, "single", body=completion())
        wide = await gw.arequest("POST", COMPLETIONS, "single", body=completion(n=2))
        other = await gw.arequest("POST", COMPLETIONS, "plain", body=completion())
        held.set()
        return await first, second, wide, other

    first, second, wide, other = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert first.status_code == 200 and other.status_code == 200
    assert second.status_code == 429 and "more than 1 concurrent requests" in error(second)["message"]
    assert second.headers["retry-after"] == "1"
    assert wide.status_code == 429 and "2 sequences" in error(wide)["message"]
    assert gw.post("single", completion()).status_code == 200, "the slot is free again once the first ended"
    assert len(gw.fake.generated()) == 3


def test_an_escalated_key_gets_the_escalation_lambda_as_its_floor(gw):
    """``watched`` escalates past 30 output tokens an hour (counted from what vLLM returned)."""
    before = gw.post("watched", completion(max_tokens=1, logprobs=1))
    assert before.status_code == 200 and before.headers["x-antidistillation-lambda"] == "0.5"
    res = gw.post("watched", completion(max_tokens=30))
    assert res.status_code == 200 and res.headers["x-antidistillation-lambda"] == "0.5"
    assert gw.last_audit()["completion_tokens"] == 30 and gw.last_audit()["escalated"] is False
    res = gw.post("watched", completion())
    assert res.status_code == 200 and res.headers["x-antidistillation-lambda"] == "4"
    assert gw.fake.generated()[-1].xargs["ad_lambda"] == 4.0
    line = gw.last_audit()
    assert line["escalated"] is True and line["lambda"] == 4.0
    assert status_param(gw.post("watched", completion(logprobs=1))) == (403, "logprobs"), "no logprobs escalated"
    below = gw.post("watched", completion(vllm_xargs={"ad_lambda": 1.0}))  # inside the tier's own range
    assert status_param(below) == (403, "ad_lambda") and "[4, 4]" in error(below)["message"]
    at = gw.post("watched", completion(), headers=[("x-antidistillation-lambda", "4")])
    assert at.status_code == 200 and gw.fake.generated()[-1].xargs["ad_lambda"] == 4.0
    assert gw.post("free", completion()).headers["x-antidistillation-lambda"] == "3", "other keys are not escalated"


def test_keys_of_one_account_escalate_together(gw):
    """acme-a streams 31 tokens without asking for usage; they are counted from the stream's running
    usage, and acme-b, another key of the account, is served at the account's escalation λ."""
    res = gw.post("acme-a", chat(max_tokens=31, stream=True))
    assert res.status_code == 200 and res.headers["x-antidistillation-lambda"] == "1"
    assert gw.last_audit()["completion_tokens"] == 31
    for name in ("acme-b", "acme-a"):
        res = gw.post(name, completion())
        assert res.headers["x-antidistillation-lambda"] == "2", name
        assert gw.fake.generated()[-1].xargs["ad_lambda"] == 2.0 and gw.last_audit()["escalated"] is True
    assert gw.post("plain", completion()).headers["x-antidistillation-lambda"] == "1", "same tier, no account"


# --- the client's vllm_xargs and the forwarded body ------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "headers", "lam"),
    [
        ({"vllm_xargs": {"ad_lambda": 4.5}}, [], 4.5),
        ({"vllm_xargs": {"ad_lambda": "5"}}, [], 5.0),
        ({}, [("x-antidistillation-lambda", "6")], 6.0),
        ({"vllm_xargs": {"ad_lambda": 3.5}}, [("x-antidistillation-lambda", "3.5")], 3.5),
        ({}, [("X-Antidistillation-Lambda", "4"), ("x-antidistillation-lambda", "4")], 4.0),
    ],
)
def test_a_client_lambda_inside_the_range_is_used(gw, fields, headers, lam):
    res = gw.post("free", completion(**fields), headers=headers)
    assert res.status_code == 200 and res.headers["x-antidistillation-lambda"] == f"{lam:g}", res.text
    (got,) = gw.fake.generated()
    assert got.xargs["ad_lambda"] == lam and set(got.xargs) == {"ad_lambda", "ad_ticket", "ad_salt", "ad_tier"}


@pytest.mark.parametrize(
    ("fields", "headers", "expected"),
    [
        ({"vllm_xargs": {"ad_lambda": 7}}, [], (403, "ad_lambda")),
        ({"vllm_xargs": {"ad_lambda": 1}}, [], (403, "ad_lambda")),  # below the tier's floor
        ({}, [("x-antidistillation-lambda", "0")], (403, "ad_lambda")),
        ({"vllm_xargs": {"ad_lambda": 4.5}}, [("x-antidistillation-lambda", "5")], (400, "x-antidistillation-lambda")),
        ({}, [("x-antidistillation-lambda", "abc")], (400, "x-antidistillation-lambda")),
        ({}, [("x-antidistillation-lambda", "inf")], (400, "x-antidistillation-lambda")),
        ({}, [("x-antidistillation-lambda", "4"), ("X-Antidistillation-Lambda", "5")], (400, LAMBDA)),
        ({"vllm_xargs": {"ad_lambda": "many"}}, [], (400, "vllm_xargs.ad_lambda")),
        ({"vllm_xargs": {"ad_profile": "code"}}, [], (403, "ad_profile")),
        ({"vllm_xargs": {"ad_ticket": 1}}, [], (403, "ad_ticket")),  # a client cannot name its own ticket
        ({"vllm_xargs": {"ad_mode": "permutation"}}, [], (403, "ad_mode")),
        ({"vllm_xargs": {"ad_on_failure": "degrade"}}, [], (403, "ad_on_failure")),
        ({"vllm_xargs": {"ad_salt": "another-tenant"}}, [], (403, "ad_salt")),
        ({"vllm_xargs": {"kv_transfer_params": "x"}}, [], (400, "kv_transfer_params")),
        ({"vllm_xargs": {"ad_lambda": 4, "foo": 1}}, [], (400, "foo")),
        ({"ad_lambda": 0}, [], (403, "ad_lambda")),  # outside vllm_xargs
        ({"AD_PROFILE": "code"}, [], (403, "AD_PROFILE")),
        ({"extra": {"deep": [{"ad_mode": "permutation"}]}}, [], (403, "extra.deep[0].ad_mode")),
        ({"kv_transfer_params": {"do_remote_prefill": True}}, [], (403, "kv_transfer_params")),
        ({"priority": 5}, [], (403, "priority")),
        ({"max_tokens": 65}, [], (403, "max_tokens")),
        ({"use_beam_search": True, "n": 2}, [], (403, "use_beam_search")),
        ({"prompt_logprobs": 1}, [], (403, "prompt_logprobs")),
    ],
)
def test_client_controls_outside_the_allow_list_are_refused(gw, fields, headers, expected):
    res = gw.post("free", completion(**fields), headers=headers)
    assert status_param(res) == expected, res.text
    assert gw.fake.received == []
    assert gw.last_audit()["status"] == expected[0] and gw.last_audit()["lambda"] is None


def test_smuggled_chat_controls_are_refused(gw):
    messages = [{"role": "user", "content": "hi", "ad_lambda": 0}]
    assert status_param(gw.post("free", chat(messages=messages))) == (403, "messages[0].ad_lambda")
    assert gw.fake.received == []


def test_unknown_fields_are_stripped_and_the_decision_is_forwarded(gw):
    res = gw.post("free", completion(ad_ticket=5, ad_salt="mine", colour="red", max_tokens="64"))
    assert res.status_code == 200, res.text
    (got,) = gw.fake.generated()
    body = got.body
    assert not {"ad_ticket", "ad_salt", "colour"} & set(body), body
    assert body["max_tokens"] == 64 and body["prompt"] == "The sum of 12" and body["temperature"] == 0
    assert got.ticket != 5 and got.xargs["ad_salt"] == body["cache_salt"] != "mine"


def test_the_forwarded_body_carries_the_decided_lambda_a_ticket_and_the_tenant_salt(gw):
    plain = {k: v for k, v in completion().items() if k != "max_tokens"}
    for _ in range(2):
        res = gw.post("free", plain)
        assert res.status_code == 200 and res.headers["x-antidistillation-tier"] == "free"
    salted = gw.post("free", completion(cache_salt="mine"))
    other = gw.post("watched", completion())
    stream = gw.post("free", chat(stream=True))
    unprotected = gw.post("internal", completion())
    assert all(r.status_code == 200 for r in (salted, other, stream, unprotected))
    first, second, mine, theirs, streamed, internal = gw.fake.generated()
    for got in (first, second):
        assert got.body["max_tokens"] == 64, "the tier's cap where the client set none"
        assert got.xargs["ad_lambda"] == 3.0 and set(got.xargs) == {"ad_lambda", "ad_ticket", "ad_salt", "ad_tier"}
        assert got.xargs["ad_tier"] == "free", "the worker's dose metric is labelled with the tier"
        assert isinstance(got.ticket, int) and 0 < got.ticket <= MAX_TICKET
        assert got.body["cache_salt"] == got.xargs["ad_salt"] and got.body["cache_salt"].startswith("t")
        assert got.header(b"content-length") == [str(len(got.raw)).encode()]
    assert first.ticket != second.ticket, "one ticket per request"
    assert first.body["cache_salt"] == second.body["cache_salt"], "one key, one tenant"
    assert mine.body["cache_salt"] not in (first.body["cache_salt"], "mine"), "the client's salt splits its own cache"
    assert theirs.body["cache_salt"] != first.body["cache_salt"], "another key, another tenant"
    assert streamed.body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert streamed.body["max_tokens"] == 4 and streamed.xargs["ad_lambda"] == 3.0
    assert internal.ticket is None and internal.xargs["ad_lambda"] == 0.0, "λ = 0 is not watched"
