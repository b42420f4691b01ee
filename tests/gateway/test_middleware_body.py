"""Bounded bodies, in-process (tests/gateway/asgi.py): a body over the limit is a 413 as soon as it
is known to be over (by its declared length, before any byte is read; while reading a chunked
one), the limit follows the served model's max_model_len on vLLM's app state (or
``--max-body-bytes``), a body that is not a request is vLLM's 400, and a body the client never
finished reaches nothing downstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest
from antidistill.server.gateway.request import max_body_bytes

from tests.gateway.asgi import CHAT, COMPLETIONS, MAX_MODEL_LEN, Gateway, ServedApp, completion, error, open_gateway

TIERS = {"internal": {"lambda": 0.0}, "free": {"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 64}}
LIMIT = max_body_bytes(MAX_MODEL_LEN)  # 64 bytes a token of the context, plus 1 MiB for the other fields
CHUNK = 65536


@pytest.fixture(scope="module")
def gw(tmp_path_factory) -> Iterator[Gateway]:
    with open_gateway(tmp_path_factory.mktemp("body"), TIERS) as gateway:
        yield gateway


@pytest.fixture(autouse=True)
def fresh(gw: Gateway) -> None:
    gw.fake.reset()


def declared(size: int) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(size).encode())]


def body_of(size: int) -> bytes:
    """A valid completions body of exactly ``size`` bytes (padded in ``user``)."""
    base = completion(max_tokens=1, user="")
    pad = size - len(json.dumps(base).encode())
    assert pad >= 0
    raw = json.dumps({**base, "user": "u" * pad}).encode()
    assert len(raw) == size
    return raw


def too_large(out, limit: int) -> None:
    assert out.status == 413, (out.status, out.body[:200])
    err = out.json()["error"]
    assert err["type"] == "request_too_large" and f"limit of {limit} bytes" in err["message"], err


def test_declared_oversize_is_413_before_reading(gw):
    first = [{"type": "http.request", "body": b'{"prompt": "' + b"x" * CHUNK, "more_body": True}]
    out = gw.raw(COMPLETIONS, first, declared(20_000_000), name="internal")
    too_large(out, LIMIT)
    assert out.reads == 0, "not one chunk of a body declared too large is read"
    out = gw.raw(COMPLETIONS, first, declared(LIMIT + 1), name="internal")
    too_large(out, LIMIT)
    assert out.reads == 0
    assert gw.fake.received == []
    line = gw.last_audit()
    assert line["status"] == 413 and line["tier"] == "internal" and line["completion_tokens"] == 0


def test_chunked_oversize_is_413_as_soon_as_the_limit_is_passed(gw):
    async def endless() -> AsyncIterator[dict]:  # no length declared, and no last chunk: then the client is gone
        for _ in range(3 * LIMIT // CHUNK):
            await asyncio.sleep(0)
            yield {"type": "http.request", "body": b"x" * CHUNK, "more_body": True}

    out = gw.raw(COMPLETIONS, endless(), [(b"transfer-encoding", b"chunked")], name="internal")
    too_large(out, LIMIT)
    assert out.reads == LIMIT // CHUNK + 1, "reading stops at the chunk that passes the limit"
    assert gw.fake.received == [] and gw.last_audit()["status"] == 413


def test_the_limit_is_exact(gw):
    fits = gw.post("internal", body_of(LIMIT))
    assert fits.status_code == 200, fits.text[:300]
    (got,) = gw.fake.received
    assert len(got.body["user"]) > CHUNK and got.header(b"content-length") == [str(len(got.raw)).encode()]
    over = gw.post("internal", body_of(LIMIT + 1))
    assert over.status_code == 413 and error(over)["type"] == "request_too_large"
    assert len(gw.fake.received) == 1
    chunks = [{"type": "http.request", "body": part, "more_body": True} for part in _split(body_of(LIMIT))]
    chunks.append({"type": "http.request", "body": b"", "more_body": False})
    out = gw.raw(COMPLETIONS, chunks, [(b"transfer-encoding", b"chunked")], name="internal")
    assert out.status == 200 and len(gw.fake.received) == 2
    assert gw.fake.received[1].header(b"content-length") == [str(len(gw.fake.received[1].raw)).encode()]


def _split(raw: bytes) -> list[bytes]:
    return [raw[i : i + CHUNK] for i in range(0, len(raw), CHUNK)]


def test_the_limit_follows_the_served_max_model_len(gw):
    small = b'{"prompt": "x", "max_tokens": 1}'
    for max_model_len in (MAX_MODEL_LEN, 1024, None):  # None: the model's length is unknown → 32768
        app = ServedApp(gw.middleware, max_model_len)
        limit = max_body_bytes(max_model_len)
        assert limit == 64 * (max_model_len or 32768) + (1 << 20)
        length = [("content-length", str(limit + 1))]
        over = gw.request("POST", COMPLETIONS, "internal", body=small, app=app, headers=length)
        assert over.status_code == 413 and f"limit of {limit} bytes" in error(over)["message"], max_model_len
    assert gw.fake.received == []


def test_max_body_bytes_overrides_the_derived_limit(tmp_path):
    with open_gateway(tmp_path, TIERS, max_body_bytes=2000) as gw:
        assert gw.post("internal", body_of(2000)).status_code == 200
        over = gw.post("internal", body_of(2001))
        assert over.status_code == 413 and "limit of 2000 bytes" in error(over)["message"]
        assert len(gw.fake.received) == 1


@pytest.mark.parametrize(
    ("path", "raw", "needle", "param"),
    [
        (COMPLETIONS, b"", "request body is missing", None),
        (COMPLETIONS, b"{", "not valid JSON", None),
        (COMPLETIONS, b'{"prompt": "x",}', "not valid JSON", None),
        (COMPLETIONS, b"\xff\xfe", "not valid JSON", None),
        (COMPLETIONS, b"[1]", "must be a JSON object", None),
        (COMPLETIONS, b'"prompt"', "must be a JSON object", None),
        (COMPLETIONS, b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested more than", None),
        (COMPLETIONS, b'{"prompt": "x", "user": ' + b'{"a":' * 900 + b"1" + b"}" * 901, "nested more than", None),
        (COMPLETIONS, b'{"prompt": "x", "max_tokens": "lots"}', "max_tokens", "max_tokens"),
        (COMPLETIONS, b'{"prompt": "x", "vllm_xargs": [1]}', "vllm_xargs", "vllm_xargs"),
        (COMPLETIONS, b'{"prompt": "x", "structured_outputs": [1]}', "structured_outputs", "structured_outputs"),
        (COMPLETIONS, b'{"prompt": "x", "max_tokens": 1e400}', "max_tokens", "max_tokens"),
        (COMPLETIONS, b'{"prompt": "x", "vllm_xargs": {"ad_lambda": NaN}}', "must be finite", "vllm_xargs.ad_lambda"),
        (CHAT, b'{"prompt": "x"}', "messages", "messages"),  # the route decides the model
        (CHAT, b'{"messages": "hi"}', "messages", "messages"),
    ],
)
def test_bodies_that_are_not_requests_are_400(gw, path, raw, needle, param):
    res = gw.request("POST", path, "free", body=raw)
    assert res.status_code == 400, (raw[:60], res.status_code, res.text[:300])
    err = error(res)
    assert err["type"] == "invalid_request_error" and err["param"] == param and needle in err["message"], err
    assert "\n" not in err["message"]
    assert gw.fake.received == []
    line = gw.last_audit()
    assert line["status"] == 400 and line["lambda"] is None and line["tier"] == "free"


def test_a_body_the_client_never_finished_reaches_nothing(gw):
    """The client sends part of its body and goes away (uvicorn then reports ``http.disconnect``):
    nothing may run for it, whether or not the part happens to be JSON."""
    before = len(gw.tap.lines)
    for part in (b'{"prompt": "The sum of', b'{"prompt": "x", "max_tokens": 2}'):
        chunks = [{"type": "http.request", "body": part, "more_body": True}, {"type": "http.disconnect"}]
        out = gw.raw(COMPLETIONS, chunks, declared(len(part) + 100), name="internal")
        forwarded = [r.raw for r in gw.fake.received]
        assert forwarded == [], f"an unfinished body was admitted and forwarded to vLLM: {forwarded}"
        assert out.messages == [] or out.status >= 400, (part, out.messages[:1])
        assert all(line["status"] != 200 for line in gw.audit(before)), "audited as a served request"
