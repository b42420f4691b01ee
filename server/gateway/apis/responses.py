"""OpenAI's Responses API (``POST /v1/responses``), as vLLM 0.32 reads it (0.33's changes: docs/vllm-compat.md).

Its only logprobs are the sampled tokens' (``top_logprobs`` with ``include`` of
``message.output_text.logprobs``). Its stream carries no running count: the delta events are a
lower bound while it runs, the ``response.completed`` usage is exact, and a stream that ends
without it is charged its whole output budget.

Stored responses (vLLM's ``VLLM_ENABLE_RESPONSES_API_STORE=1``) are keyed by the request's id, so
the gateway assigns every id itself with an unforgeable owner tag: a key reads, continues
(``previous_response_id``) or cancels only its own tenant's responses, without any state here.
Background mode runs with no connection for the fail-closed guard to stop, so it is refused on
protected requests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from antidistill.server.gateway.apis.base import Limits, StreamCount, TypedEvents, count, estimate_tokens, kind
from antidistill.server.gateway.errors import Refusal
from pydantic import BaseModel
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

PROCESS_KEY = secrets.token_bytes(32)  # without a tenant key: ids are only ever read back by this process's store
TAG_HEX, RANDOM_HEX = 16, 32
FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


@dataclass(frozen=True)
class Owner:
    """A tenant as stored responses know it: ids carry a keyed tag of the tenant that created them."""

    key: bytes
    tenant: str

    @classmethod
    def of(cls, key: bytes | None, tenant: str) -> Owner:
        return cls(key or PROCESS_KEY, tenant)

    def tag(self) -> str:
        return hmac.new(self.key, f"response\n{self.tenant}".encode(), hashlib.sha256).hexdigest()[:TAG_HEX]

    def new_id(self) -> str:
        return f"resp_{self.tag()}{secrets.token_hex(RANDOM_HEX // 2)}"

    def owns(self, response_id: str) -> bool:
        """``response_id`` was made by ``new_id`` for this tenant."""
        if not response_id.startswith("resp_") or len(response_id) != 5 + TAG_HEX + RANDOM_HEX:
            return False
        return hmac.compare_digest(response_id[5 : 5 + TAG_HEX], self.tag())


def not_found(response_id: str, param: str | None = None) -> Refusal:
    """vLLM's own answer for an id it does not hold: another tenant's ids are not told apart from unknown ones."""
    return Refusal(404, f"Response with id '{response_id[:80]}' not found.", param)


class Responses(TypedEvents):
    route = "/v1/responses"
    name = "responses"
    model = ResponsesRequest
    limits = Limits(("max_output_tokens",), "max_output_tokens")
    PREAMBLE = ("response.created", "response.in_progress")

    def checks(self, request: BaseModel, raw: dict[str, Any], protected: bool, owner: Owner) -> dict[str, Any]:
        if "request_id" in raw:
            message = "request_id is assigned by this server: it names the stored response"
            raise Refusal(400, message, "request_id")
        previous = request.previous_response_id
        if previous is not None and not owner.owns(previous):
            raise not_found(previous, "previous_response_id")
        if protected and request.background:
            message = (
                "background mode is not available on protected (λ > 0) requests: "
                "nothing could stop one the proxy fails on"
            )
            raise Refusal(403, message, "background")
        return {"request_id": owner.new_id()}

    def sampled_logprobs(self, view: BaseModel) -> float | None:
        return count(view.top_logprobs or 0) if view.is_include_output_logprobs() else None

    def prompt_tokens(self, view: BaseModel) -> list[int]:
        return [estimate_tokens([view.instructions, view.input])]

    def stream_end(self, count: StreamCount, status: int, message: str) -> bytes:
        event = {"type": "error", "code": kind(status), "message": message, "param": None}
        event["sequence_number"] = count.sequence + 1
        return f"event: error\ndata: {json.dumps(event)}\n\n".encode()

    def take(self, count: StreamCount, data: dict[str, Any]) -> None:
        if isinstance(data.get("sequence_number"), int):
            count.sequence = max(count.sequence, data["sequence_number"])
        what = data.get("type")
        if isinstance(what, str) and what.endswith(".delta"):
            count.completion += 1  # at least one token each
        elif what in FINAL_EVENTS and isinstance(data.get("response"), dict):
            count.set_usage(data["response"].get("usage"), final=True)
