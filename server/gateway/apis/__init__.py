"""The client APIs the gateway protects, one module each: what differs between them is how vLLM
reads a request (its model, where the output limit and the logprobs side channels live), what a
refusal looks like to the API's own SDK, and how a stream says how much it sent. Everything else —
keys, tiers, λ, limits, escalation, the fail-closed guard — is one path for all of them.

``api_for(path)`` is the one routing table: a route not in it generates nothing through the gateway.
"""

from __future__ import annotations

from antidistill.server.gateway.apis.base import Api, StreamCount
from antidistill.server.gateway.apis.messages import Messages
from antidistill.server.gateway.apis.openai import ChatCompletions, Completions
from antidistill.server.gateway.apis.responses import Responses

APIS: dict[str, Api] = {api.route: api for api in (Completions(), ChatCompletions(), Responses(), Messages())}
DEFAULT = APIS["/v1/chat/completions"]  # the error shape of routes that generate nothing


def api_for(path: str) -> Api | None:
    """The API that generates on ``path`` (None: the route generates nothing)."""
    return APIS.get(path)


def errors_for(path: str) -> Api:
    """The API whose error shape answers a refusal on ``path`` (Anthropic's under /v1/messages)."""
    return APIS["/v1/messages"] if path.startswith("/v1/messages") else APIS.get(path, DEFAULT)


__all__ = ["APIS", "Api", "StreamCount", "api_for", "errors_for"]
