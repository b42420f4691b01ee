"""Anthropic's Messages API (``POST /v1/messages``), as vLLM 0.32 reads it (0.33's changes: docs/vllm-compat.md).

vLLM serves a Messages request by converting it to a chat completion request
(``AnthropicServingMessages.to_chat_completion_request``) and running that: the policy reads that
same conversion, so it decides on what the engine runs; the fields it sets (``vllm_xargs``,
``cache_salt``, ``watermarking``) are carried by the conversion unchanged. (vLLM 0.33 resolves
``thinking: disabled`` to an effort by probing the chat template; the view keeps the default, and no
decision here reads it.) ``max_tokens`` is
required, so a tier's cap is only ever checked, never written.

Its stream carries no running count: content deltas are a lower bound while it runs, the final
``message_delta`` usage is exact, and a stream that ends without it is charged its whole output
budget. Errors take Anthropic's shape, so the ``anthropic`` SDK raises them as it would Anthropic's.
"""

from __future__ import annotations

import json
from typing import Any

from antidistill.server.gateway.apis.base import Limits, StreamCount, TypedEvents, kind
from antidistill.server.gateway.apis.openai import ChatCompletions
from antidistill.server.gateway.errors import Refusal
from pydantic import BaseModel
from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages

CHAT = ChatCompletions()


def anthropic_kind(status: int) -> str:
    return "overloaded_error" if status == 503 else "api_error" if status >= 500 else kind(status)


class Messages(TypedEvents):
    route = "/v1/messages"
    name = "messages"
    model = AnthropicMessagesRequest
    limits = Limits(("max_tokens",), None)
    PREAMBLE = ("message_start", "ping")

    def view(self, request: BaseModel) -> BaseModel:
        try:
            return AnthropicServingMessages.to_chat_completion_request(request)
        # vLLM's converter on a shape it did not expect: the request's fault, never a 500
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise Refusal(400, f"invalid request: {type(exc).__name__} {exc}") from None

    def sampled_logprobs(self, view: BaseModel) -> float | None:
        return CHAT.sampled_logprobs(view)

    def prompt_logprobs(self, view: BaseModel) -> float | None:
        return CHAT.prompt_logprobs(view)

    def error_body(self, status: int, message: str, param: str | None = None) -> bytes:
        return json.dumps({"type": "error", "error": {"type": anthropic_kind(status), "message": message}}).encode()

    def stream_end(self, count: StreamCount, status: int, message: str) -> bytes:
        return b"event: error\ndata: " + self.error_body(status, message) + b"\n\n"

    def take(self, count: StreamCount, data: dict[str, Any]) -> None:
        what = data.get("type")
        if what == "content_block_delta":
            count.completion += 1  # at least one token each
        elif what == "message_start":
            message: Any = data.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict) and isinstance(usage.get("input_tokens"), int):
                count.prompt = usage["input_tokens"]
        elif what == "message_delta":
            count.set_usage(data.get("usage"), final=True)
