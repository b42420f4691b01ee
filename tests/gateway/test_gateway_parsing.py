"""One parser, one caller, bounded bodies, counting from the response: the confirmed bypasses of a
black-box probe, each over HTTP against `antidistill serve` on tiny models (one server for the
module), each judged by what came back and by the audit line, not by headers alone."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from antidistill.server.gateway.request import max_body_bytes

from tests.helpers import Server, audit_lines, audit_until, chat, completion, engine_fixture, tiny_server

TIERS = {
    "free": {"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 64},
    "watched": {"lambda": 0.5, "max_lambda": 1.0, "escalation": {"tokens_per_hour": 20, "lambda": 4.0}},
    "internal": {"lambda": 0.0},
}
MAX_MODEL_LEN = 256  # antidistill.benchmarks.tiny.serving.server_flags
LOGPROB_KEYS = ("logprobs", "top_logprobs", "prompt_logprobs")


@engine_fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[Server]:
    with tiny_server(tmp_path_factory.mktemp("gateway"), TIERS) as server:
        yield server


def route(body: dict) -> str:
    return "/v1/chat/completions" if body.get("messages") else "/v1/completions"


def call(srv: Server, tier: str | None, path: str, body: dict | bytes, headers: list | None = None, **kw) -> tuple:
    """One request and the audit line it wrote (requests here run one at a time)."""
    before = len(audit_lines(srv))
    auth = list(srv.auth(tier).items())
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = [("content-type", "application/json"), *auth, *(headers or [])]
    res = httpx.post(srv.base + path, content=content, headers=hdrs, timeout=120, **kw)
    lines = audit_until(srv, lambda lines: len(lines) > before)
    assert len(lines) > before, "no audit line"
    return res, lines[before]


def no_logprob_data(res: httpx.Response) -> bool:
    text = res.text.replace(" ", "")
    return all(f'"{key}":' not in text or f'"{key}":null' in text for key in LOGPROB_KEYS)


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]


# --- one parser --------------------------------------------------------------------------------


def test_the_channels_are_real_on_an_unprotected_tier(srv):
    """The controls: what the refusals below withhold does come back where the tier allows it,
    including raw prompt logprobs for ``logprobs: false`` + echo and chat ``echo`` alone."""
    res, _ = call(srv, "internal", "/v1/completions", completion(srv, logprobs=False, echo=True, max_tokens=1))
    assert res.status_code == 200 and res.json()["choices"][0]["logprobs"]["token_logprobs"][1] is not None
    res, _ = call(srv, "internal", "/v1/chat/completions", chat(srv, echo=True, max_tokens=1))
    assert res.status_code == 200 and res.json().get("prompt_logprobs"), res.text[:300]


@pytest.mark.parametrize("spelling", [False, 0, 0.0, True, 1, "false", "0"])
@pytest.mark.parametrize("echo", [False, True])
def test_completion_logprobs_however_spelled(srv, spelling, echo):
    body = completion(srv, logprobs=spelling, echo=echo, messages=[], top_logprobs=0)
    res, line = call(srv, "free", "/v1/completions", body)
    assert res.status_code in (400, 403), res.text[:300]
    assert "choices" not in res.text and no_logprob_data(res)
    assert line["status"] == res.status_code and line["completion_tokens"] == 0


@pytest.mark.parametrize("body", [{"logprobs": True}, {"logprobs": "true"}, {"logprobs": 1, "top_logprobs": "1"},
                                  {"echo": True}, {"echo": "true"}, {"prompt_logprobs": 0},
                                  {"logprobs": "false", "top_logprobs": 2}])  # fmt: skip
def test_chat_logprobs_however_spelled(srv, body):
    res, line = call(srv, "free", "/v1/chat/completions", chat(srv, prompt="decoy", **body))
    assert res.status_code in (400, 403), res.text[:300]
    assert "choices" not in res.text and no_logprob_data(res)
    assert line["status"] == res.status_code and line["completion_tokens"] == 0


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", ["200", 200.0, "65", 65.0])
def test_caps_however_spelled(srv, field, value):
    bodies = [chat(srv, **{field: value})]
    if field == "max_tokens":
        bodies.append(completion(srv, max_tokens=value, messages=[]))
    for body in bodies:
        res, line = call(srv, "free", route(body), {**body, "ignore_eos": True})
        assert res.status_code == 403 and field in res.json()["error"]["message"], res.text[:300]
        assert line["completion_tokens"] == 0


@pytest.mark.parametrize("value", ["64", 64.0, None])
def test_cap_holds_exactly_and_tokens_are_counted_exactly(srv, value):
    """At the cap (spelled as a string, a float, or left to the tier): exactly the cap comes back,
    and the audit line says so."""
    for body in (completion(srv, max_tokens=value), chat(srv, max_tokens=value)):
        res, line = call(srv, "free", route(body), {**body, "ignore_eos": True})
        assert res.status_code == 200, res.text[:300]
        assert res.json()["usage"]["completion_tokens"] == 64 == line["completion_tokens"]


@pytest.mark.parametrize("spelling", [False, 0, "false", "0", "no", "off"])
def test_stream_flag_however_spelled(srv, spelling):
    """Not a stream to vLLM is not a stream to the gateway: the JSON body's usage is counted."""
    for body in (completion(srv, max_tokens=6), chat(srv, max_tokens=6)):
        res, line = call(srv, "free", route(body), {**body, "stream": spelling, "ignore_eos": True})
        assert res.status_code == 200 and res.headers["content-type"].startswith("application/json"), res.text
        assert line["stream"] is False and line["completion_tokens"] == 6 == res.json()["usage"]["completion_tokens"]


@pytest.mark.parametrize("spelling", [True, 1, "true", "1", "yes", "on"])
def test_stream_counted_from_the_usage_event(srv, spelling):
    for body in (completion(srv, max_tokens=5), chat(srv, max_tokens=5)):
        res, line = call(srv, "free", route(body), {**body, "stream": spelling, "ignore_eos": True})
        assert res.headers["content-type"].startswith("text/event-stream"), res.text[:300]
        events = sse_events(res.text)
        assert not any(e.get("usage") for e in events), "the usage event we asked for is not forwarded"
        assert line["stream"] is True and line["completion_tokens"] == 5


def test_escalation_sees_a_non_stream_spelled_as_a_string(srv):
    res, line = call(srv, "watched", "/v1/completions", completion(srv, max_tokens=30, stream="false", ignore_eos=True))
    assert res.status_code == 200 and line["completion_tokens"] == 30 and line["lambda"] == 0.5
    res, line = call(srv, "watched", "/v1/completions", completion(srv, max_tokens=2))
    assert res.headers["x-antidistillation-lambda"] == "4" and line["lambda"] == 4.0 and line["escalated"]


def test_invalid_bodies_get_vllms_400_before_policy(srv):
    cases = [
        (completion(srv, max_tokens="lots"), "max_tokens"),
        (completion(srv, logprobs="2"), "logprobs"),
        (chat(srv, stream_options={"include_usage": True}), "stream_options"),
        ({"model": srv.model, "prompt": "x"}, "messages"),  # a completions body on the chat route
    ]
    for body, param in cases:
        path = "/v1/chat/completions" if param in ("stream_options", "messages") else "/v1/completions"
        res, line = call(srv, "free", path, body)
        error = res.json()["error"]
        assert res.status_code == 400 and error["param"] == param and line["lambda"] is None, (body, res.text)


# --- one caller --------------------------------------------------------------------------------


def test_exactly_one_credential(srv):
    keys = srv.keys
    body = completion(srv)
    cases = [
        ([("Authorization", "Bearer ad-revoked"), ("Authorization", f"Bearer {keys['internal']}")], None, 400),
        ([("Authorization", f"Bearer {keys['free']}"), ("Authorization", f"Bearer {keys['free']}")], None, 400),
        ([("Authorization", f"Bearer {keys['free']}"), ("x-api-key", keys["internal"])], None, 400),
        ([("Authorization", f"Bearer {keys['free']}"), ("api-key", keys["free"])], None, 400),
        ([("Authorization", f"Bearer {keys['free']}")], {"api_key": keys["internal"]}, 400),
        ([("x-api-key", keys["internal"])], None, 400),
        ([("Authorization", f"Basic {keys['internal']}")], None, 401),
    ]
    for headers, params, status in cases:
        res, line = call(srv, None, "/v1/completions", body, headers, params=params)
        assert res.status_code == status, (headers, params, res.text)
        assert "choices" not in res.text and line["status"] == status and line["tier"] is None
        message = res.json()["error"]["message"]
        assert ("Authorization headers" in message) or ("credential in" in message) or ("scheme" in message)
    ok, _ = call(srv, "free", "/v1/completions", body)
    assert ok.status_code == 200


# --- bounded bodies ----------------------------------------------------------------------------


def raw_post(srv: Server, head: str, first: bytes) -> tuple[bytes, float]:
    """Send the head and the first bytes of a body, then only read: the answer must not need the rest."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as sock:
        sock.sendall(head.encode() + first)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < 200:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    return received, time.monotonic() - start


def test_oversized_bodies_are_413_without_reading_them(srv):
    limit = max_body_bytes(MAX_MODEL_LEN)
    key = srv.keys["internal"]
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\nauthorization: Bearer {key}\r\n"
    )
    declared, seconds = raw_post(srv, head + "content-length: 20000000\r\n\r\n", b'{"prompt": "' + b"x" * 65536)
    assert declared.startswith(b"HTTP/1.1 413") and b"request body is larger" in declared, declared[:300]
    assert seconds < 10
    sizes = [65536] * (limit // 65536) + [limit % 65536 + 1]  # one byte over, and no last chunk
    chunked = b"".join(b"%x\r\n%s\r\n" % (n, b"x" * n) for n in sizes)
    streamed, _ = raw_post(srv, head + "transfer-encoding: chunked\r\n\r\n", chunked)
    assert streamed.startswith(b"HTTP/1.1 413"), streamed[:300]
    lines = audit_until(srv, lambda lines: [x["status"] for x in lines[-2:]] == [413, 413])[-2:]
    assert [x["status"] for x in lines] == [413, 413] and all(x["completion_tokens"] == 0 for x in lines), lines
    fits = completion(srv, max_tokens=1)
    pad = limit - len(json.dumps({**fits, "user": ""}).encode())
    res, line = call(srv, "internal", "/v1/completions", {**fits, "user": "u" * pad})
    assert res.status_code == 200 and line["completion_tokens"] == 1, res.text[:300]
    res, line = call(srv, "internal", "/v1/completions", {**fits, "user": "u" * (pad + 1)})
    assert res.status_code == 413 and res.json()["error"]["type"] == "request_too_large"
