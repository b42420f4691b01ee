"""Request bodies: read with a bound (413 as soon as it is passed, never buffered whole), and the
rewritten body replayed to vLLM's app in place of the client's."""

from __future__ import annotations

from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.request import max_body_bytes
from starlette.types import Message, Receive, Scope


async def read_body(receive: Receive, scope: Scope, override: int | None = None) -> bytes:
    """The request body, refused (413) as soon as it passes the limit: by its declared length
    before reading, then while reading, so an oversized body is never buffered."""
    limit = body_limit(scope, override)
    declared = [v for k, v in scope["headers"] if k.lower() == b"content-length"]
    if declared and declared[0].strip().isdigit() and int(declared[0]) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # the client left mid-body: nothing may run for it
            raise Refusal(400, "the client disconnected before sending the whole request body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def body_limit(scope: Scope, override: int | None = None) -> int:
    """``override`` (--max-body-bytes), else derived from the served model's max_model_len."""
    return max_body_bytes(served_max_model_len(scope), override)


def served_max_model_len(scope: Scope) -> int | None:
    """The served model's context length, from vLLM's app state (--max-model-len, or the model's own)."""
    config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
    return getattr(getattr(config, "model_config", None), "max_model_len", None)


def _too_large(limit: int) -> Refusal:
    return Refusal(413, f"request body is larger than this server's limit of {limit} bytes")


def replay(payload: bytes, receive: Receive) -> Receive:
    """The rewritten body first; then the real channel, so the app still sees a client disconnect
    (vLLM aborts the request then) — and only then."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        return await receive()

    return replayed
