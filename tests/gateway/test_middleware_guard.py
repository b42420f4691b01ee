"""Fail closed, in-process (tests/gateway/asgi.py): the fake vLLM writes failure records into the
ledger the way the worker does (before the step's token is sampled, under the request's ticket),
and the gateway must never pass on the raw text that follows: a 503 (400 for a token the proxy
lacks) before the first byte, one error event and the end of a stream after it, the request
aborted downstream. A degrade tier is served and flagged; λ = 0 is not watched at all; and what a
stream carries of usage is what the client asked for."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import pytest
from antidistill.proxy_worker.runtime.failure_ledger import Reason

from tests.gateway.asgi import CHAT, COMPLETIONS, Gateway, Received, chat, completion, error, open_gateway, sse, token

TIERS = {
    "guarded": {"lambda": 1.0},
    "degrading": {"lambda": 1.0, "on_protection_failure": "degrade"},
    "internal": {"lambda": 0.0},
}
RING = 16  # records in the ledger: writing more than this between two reads overflows it
REFUSED_TEXT = "antidistillation protection could not be applied"


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[Gateway]:
    with open_gateway(tmp_path_factory.mktemp("guard"), TIERS, ledger_records=RING) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def fresh(gw: Gateway) -> None:
    gw.fake.reset()


def fail_at(gw: Gateway, step: int, reason: Reason = Reason.BUDGET, *, refused: bool = True, served: int = 0):
    """The worker's record for a row that has no Δ at ``step`` (before that token is sampled)."""

    def hook(rec: Received, i: int) -> None:
        if i == step:
            gw.ledger.append(rec.ticket, reason, served, refused)

    gw.fake.on_token = hook


def overflow_at(gw: Gateway, step: int) -> None:
    """Other requests' failures, more than the ring holds, between two reads of the gateway."""

    def hook(rec: Received, i: int) -> None:
        if i == step:
            for _ in range(RING + 1):
                gw.ledger.append(secrets.randbelow(2**62) + 1, Reason.ERROR)

    gw.fake.on_token = hook


def texts(events: list) -> list[str]:
    """The output text of each token event, in order."""
    out = []
    for e in events:
        if isinstance(e, dict) and e.get("choices"):
            choice = e["choices"][0]
            out.append(choice["text"] if "text" in choice else choice["delta"].get("content", ""))
    return [t for t in out if t]


def no_raw_text_from(text: str, step: int, upto: int = 64) -> bool:
    return all(token(i) not in text for i in range(step, upto))


@pytest.mark.parametrize("step", [0, 3])
@pytest.mark.parametrize(("reason", "why"), [(Reason.BUDGET, "KV cache was full"), (Reason.ERROR, "step failed")])
def test_a_failed_request_is_a_503_and_returns_no_text(gw, step, reason, why):
    fail_at(gw, step, reason)
    res = gw.post("guarded", completion(max_tokens=8))
    assert res.status_code == 503, res.text
    err = error(res)
    assert err["type"] == "service_unavailable" and REFUSED_TEXT in err["message"] and why in err["message"]
    assert int(res.headers["retry-after"]) >= 1
    assert res.headers["x-antidistillation-lambda"] == "1"
    assert "choices" not in res.text and no_raw_text_from(res.text, 0)
    line = gw.last_audit()
    assert line["status"] == 503 and line["protected"] is False and line["refused"] is True
    assert line["protection_failure"] == reason.label and line["unprotected_tokens"] == 0


def test_the_kv_budget_refusal_says_when_to_retry(gw):
    fail_at(gw, 0, Reason.BUDGET)
    res = gw.post("guarded", chat(max_tokens=4))
    assert res.status_code == 503 and res.headers["retry-after"] == "2"
    assert "content" not in res.text and no_raw_text_from(res.text, 0)


def test_a_refused_request_is_aborted_downstream_before_it_ends(gw):
    """The guard reports a disconnect to vLLM once the ledger names the request, so the engine stops
    generating for it (here within a few of its 200 steps) instead of running to its end."""
    fail_at(gw, 0)
    res = gw.post("guarded", completion(max_tokens=200))
    assert res.status_code == 503 and no_raw_text_from(res.text, 0, 200)
    (rec,) = gw.fake.generated()
    assert rec.aborted and rec.sent < 200, rec.sent


def test_a_token_the_proxy_lacks_is_the_requests_400(gw):
    fail_at(gw, 0, Reason.VOCABULARY)
    res = gw.post("guarded", completion())
    assert res.status_code == 400 and "retry-after" not in res.headers
    assert "token id the proxy model does not have" in error(res)["message"]
    assert no_raw_text_from(res.text, 0) and gw.last_audit()["protection_failure"] == "vocabulary"


@pytest.mark.parametrize("body", [completion(max_tokens=8, stream=True), chat(max_tokens=8, stream=True)])
def test_a_stream_refused_mid_stream_ends_with_an_error_event(gw, body):
    fail_at(gw, 3)
    res = gw.post("guarded", body)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
    events = sse(res.text)
    assert texts(events) == [token(0), token(1), token(2)], "the tokens before the failure, and no other"
    assert no_raw_text_from(res.text, 3)
    *_, refusal, done = events
    assert done == "[DONE]" and res.text.endswith("data: [DONE]\n\n"), "nothing after the end"
    assert refusal["error"]["code"] == 503 and refusal["error"]["type"] == "service_unavailable"
    assert REFUSED_TEXT in refusal["error"]["message"]
    assert sum(1 for e in events if isinstance(e, dict) and "error" in e) == 1
    (rec,) = gw.fake.generated()
    assert rec.aborted and rec.sent < 8, "vLLM saw the client go: the request is aborted, not run to its end"
    line = gw.last_audit()
    assert line["stream"] is True and line["refused"] is True and line["protection_failure"] == "budget"
    assert line["completion_tokens"] == 3 and line["unprotected_tokens"] == 0


def test_a_stream_refused_before_its_first_token_is_a_503(gw):
    fail_at(gw, 0, Reason.NON_FINITE)
    res = gw.post("guarded", completion(max_tokens=8, stream=True))
    assert res.status_code == 503 and res.headers["content-type"] == "application/json"
    assert "non-finite" in error(res)["message"] and res.headers["retry-after"] == "1"
    assert "data:" not in res.text and no_raw_text_from(res.text, 0)


def test_only_the_request_whose_ticket_failed_is_refused(gw):
    def hook(rec: Received, i: int) -> None:
        if rec.body["prompt"] == "A" and i == 2:
            gw.ledger.append(rec.ticket, Reason.BUDGET, 0, True)
        if rec.body["prompt"] == "B" and i == 1:  # a ticket no live request holds
            gw.ledger.append(secrets.randbelow(2**62) + 1, Reason.BUDGET, 0, True)

    gw.fake.on_token = hook

    async def both() -> list:
        bodies = [completion(prompt=p, max_tokens=6, stream=True) for p in "AB"]
        return await asyncio.gather(*(gw.arequest("POST", COMPLETIONS, "guarded", body=b) for b in bodies))

    a, b = asyncio.run(asyncio.wait_for(both(), 10))
    assert texts(sse(a.text)) == [token(0), token(1)] and '"error"' in a.text
    assert texts(sse(b.text)) == [token(i) for i in range(6)] and '"error"' not in b.text
    assert sse(b.text)[-1] == "[DONE]"
    tickets = {r.body["prompt"]: r.ticket for r in gw.fake.generated()}
    assert tickets["A"] != tickets["B"]


def test_a_ledger_overflow_refuses_protected_requests_and_lambda_zero_is_not_guarded(gw):
    """λ = 0 carries no ticket and is not watched: a ledger that overflows while it runs (which
    leaves every protected request unverifiable) changes nothing for it."""
    overflow_at(gw, 1)
    res = gw.post("internal", completion(max_tokens=4))
    assert res.status_code == 200 and res.json()["choices"][0]["text"] == "".join(token(i) for i in range(4))
    (rec,) = gw.fake.generated()
    assert rec.ticket is None and set(rec.xargs) == {"ad_lambda", "ad_salt"} and rec.xargs["ad_lambda"] == 0.0
    assert gw.last_audit()["protected"] is None and gw.last_audit()["protection_failure"] is None
    stream = gw.post("internal", completion(max_tokens=4, stream=True))
    assert texts(sse(stream.text)) == [token(i) for i in range(4)]
    gw.fake.reset()
    overflow_at(gw, 1)
    res = gw.post("guarded", completion(max_tokens=4))
    assert res.status_code == 503 and "failure ledger overflowed" in error(res)["message"]
    assert res.headers["retry-after"] == "1" and no_raw_text_from(res.text, 0)
    assert gw.last_audit()["protection_failure"] == "unverifiable"


def test_a_degrade_tier_is_served_and_flagged(gw):
    fail_at(gw, 1, Reason.NON_FINITE, refused=False, served=1)
    res = gw.post("degrading", completion(max_tokens=4))
    assert res.status_code == 200 and res.headers["x-antidistillation-protection"] == "degraded"
    assert res.json()["choices"][0]["text"] == "".join(token(i) for i in range(4))
    line = gw.last_audit()
    assert line["protected"] is False and line["refused"] is False
    assert line["protection_failure"] == "non_finite" and line["unprotected_tokens"] == 1
    fail_at(gw, 0, Reason.BUDGET)  # a sticky failure: the worker refuses the row at once
    res = gw.post("degrading", completion(max_tokens=4))
    assert res.status_code == 503 and no_raw_text_from(res.text, 0)
    gw.fake.on_token = None
    ok = gw.post("degrading", completion(max_tokens=4))
    assert ok.status_code == 200 and "x-antidistillation-protection" not in ok.headers


def test_a_degrading_stream_is_flagged_in_band_then_refused(gw):
    """The worker serves a transient failure at step 2 with Δ = 0, revises the count at step 4, and
    refuses the row at step 6: one comment before each newly unprotected token, then the error."""
    seqs: dict[int, int] = {}

    def hook(rec: Received, i: int) -> None:
        if i == 2:
            seqs[rec.ticket] = gw.ledger.append(rec.ticket, Reason.NON_FINITE, 1, False)
        elif i == 4:
            assert gw.ledger.revise(seqs[rec.ticket], rec.ticket, 2)
        elif i == 6:
            gw.ledger.append(rec.ticket, Reason.NON_FINITE, 2, True)

    gw.fake.on_token = hook
    res = gw.post("degrading", completion(max_tokens=10, stream=True))
    assert res.status_code == 200 and "x-antidistillation-protection" not in res.headers, "the failure came later"
    events = sse(res.text)
    shape = [
        "comment" if isinstance(e, str) and e.startswith(":") else e if isinstance(e, str) else
        "error" if "error" in e else e["choices"][0]["text"]
        for e in events
    ]  # fmt: skip
    raw = [token(i) for i in range(6)]
    assert shape == [*raw[:2], "comment", *raw[2:4], "comment", *raw[4:6], "error", "[DONE]"], shape
    assert "protection degraded" in events[2] and no_raw_text_from(res.text, 6)
    line = gw.last_audit()
    assert line["refused"] is True and line["unprotected_tokens"] == 2 and line["completion_tokens"] == 6


RUNNING = {"include_usage": True, "continuous_usage_stats": True}


@pytest.mark.parametrize(
    ("options", "running", "final"),
    [(None, False, False), ({"include_usage": True}, False, True), (RUNNING, True, True)],
)
def test_a_stream_carries_the_usage_the_client_asked_for(gw, options, running, final):
    """The gateway always asks vLLM for every chunk's usage (it counts output from it); the client
    gets the per-chunk usage and the final usage event only where it asked for them."""
    fields = {"stream": True, "max_tokens": 5, **({"stream_options": options} if options else {})}
    for body in (completion(**fields), chat(**fields)):
        gw.fake.reset()
        res = gw.post("guarded", body)
        assert res.status_code == 200
        (rec,) = gw.fake.generated()
        assert rec.body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
        events = [e for e in sse(res.text) if isinstance(e, dict)]
        chunks = [e for e in events if e["choices"]]
        assert len(texts(chunks)) == 5 and sse(res.text)[-1] == "[DONE]"
        assert all(("usage" in e) == running for e in chunks), chunks[0]
        usage_events = [e for e in events if not e["choices"]]
        assert len(usage_events) == int(final)
        if final:
            assert usage_events[0]["usage"]["completion_tokens"] == 5
        assert gw.last_audit()["completion_tokens"] == 5 and gw.last_audit()["protected"] is True
        assert rec.sent == 5 and not rec.aborted


def test_a_stream_and_a_json_response_without_failures_pass_unchanged(gw):
    res = gw.post("guarded", chat(max_tokens=3))
    assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"] == token(0) + token(1) + token(2)
    assert res.json()["usage"]["completion_tokens"] == 3 and "x-antidistillation-protection" not in res.headers
    res = gw.post("guarded", completion(max_tokens=3, stream=True), path=COMPLETIONS)
    assert texts(sse(res.text)) == [token(0), token(1), token(2)]
    assert gw.last_audit()["protected"] is True and gw.last_audit()["path"] == COMPLETIONS
    assert [r.path for r in gw.fake.generated()] == [CHAT, COMPLETIONS]
