"""Refusals and their OpenAI-style error responses, for every part of the gateway that refuses a request."""

from __future__ import annotations

import json

from starlette.types import Send

KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class Refusal(Exception):
    """A request the gateway will not serve (key, body, tier, limits, signature): HTTP ``status`` with
    ``message`` naming the field (``param``), and ``Retry-After`` where waiting helps."""

    def __init__(self, status: int, message: str, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    kind = KINDS.get(status, "error")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    base = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": base + (headers or [])})
    await send({"type": "http.response.body", "body": body})
