"""What every protected API answers for the gateway: how vLLM reads its requests, what a refusal
looks like to its SDK, and how its stream counts what was sent. The defaults are the OpenAI
shapes (errors as ``{"error": {...}}``, usage as prompt/completion tokens)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from antidistill.server.gateway.errors import KINDS, error_body
from pydantic import BaseModel

if TYPE_CHECKING:
    from antidistill.server.gateway.apis.responses import Owner


@dataclass
class StreamCount:
    """What a response has shown of its size: exact once the server's own usage (or a running
    count) was read; until then ``completion`` is a lower bound and the request is charged its
    whole output budget if it ends so."""

    prompt: int = 0
    completion: int = 0
    choices: dict[int, int] = field(default_factory=dict)  # running output count per choice (OpenAI)
    exact: bool = False
    output: bool = False  # an event that can carry model output was forwarded
    unreadable: bool = False  # an event whose count could not be read
    sequence: int = -1  # the last event's sequence_number (Responses)

    def set_usage(self, usage: Any, final: bool = False) -> None:
        """The totals of a usage object in either spelling: never below what a running count
        already showed, unless ``final`` (the server's own total replaces a lower bound)."""
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        self.prompt = prompt if isinstance(prompt, int) else self.prompt
        if isinstance(completion, int):
            self.completion = completion if final else max(completion, self.completion)
            self.exact = self.exact or final


@dataclass(frozen=True)
class Limits:
    """The request fields that set its output limit, as vLLM reads them (the first it prefers), and
    the one a tier's cap is written to when the client set none (None: the API requires one)."""

    fields: tuple[str, ...]
    cap_field: str | None


class Api:
    """One client API (a generation route). Subclasses set the class attributes and override what
    their requests or streams do differently."""

    route: ClassVar[str]
    name: ClassVar[str]  # the audit and metrics label
    model: ClassVar[type[BaseModel]]
    limits: ClassVar[Limits]

    def new_count(self) -> StreamCount:
        """A response's count before anything was sent: exact only where every event carries one."""
        return StreamCount()

    def view(self, request: BaseModel) -> BaseModel:
        """The request as the engine will run it, for the policy to read (Messages: vLLM's own chat
        conversion); updates are applied to ``request`` itself."""
        return request

    def checks(self, request: BaseModel, raw: dict[str, Any], protected: bool, owner: Owner) -> dict[str, Any]:
        """Route-specific refusals (raise Refusal) and the fields the gateway sets; none by default."""
        return {}

    def sampled_logprobs(self, view: BaseModel) -> float | None:
        """Logprobs per generated token vLLM will return (None: none; inf: unlimited)."""
        return None

    def prompt_logprobs(self, view: BaseModel) -> float | None:
        """Prompt logprobs vLLM will compute (None: none)."""
        return None

    def prompt_tokens(self, view: BaseModel) -> list[int]:
        """A cheap estimate of each prompt's tokens, one entry per prompt vLLM will run."""
        return [estimate_tokens(getattr(view, "messages", None))]

    def choices(self, view: BaseModel) -> int:
        """Outputs per prompt (``n``)."""
        return max(getattr(view, "n", 1) or 1, 1)

    def stream_fields(self, view: BaseModel) -> tuple[dict[str, Any], bool, bool]:
        """For a stream: the fields that make it count its own output, whether the client asked for
        the usage event, and whether it asked for every event's running usage."""
        return {}, True, True

    def error_body(self, status: int, message: str, param: str | None = None) -> bytes:
        return error_body(status, message, param)

    def stream_end(self, count: StreamCount, status: int, message: str) -> bytes:
        """The events that end a stream refused after it started: an error, then the end marker."""
        event = {"error": json.loads(error_body(status, message))["error"]}
        return f"data: {json.dumps(event)}\n\n".encode() + b"data: [DONE]\n\n"

    def count_event(self, count: StreamCount, event: bytes, hide_usage: bool, running_usage: bool) -> bytes | None:
        """One stream event as forwarded (None: dropped), its counts taken."""
        raise NotImplementedError


class TypedEvents(Api):
    """An API whose stream is typed JSON events (``{"type": ...}``) that carry no running count:
    events are passed on unchanged, ``take`` reads each, and ``PREAMBLE`` types carry no output."""

    PREAMBLE: ClassVar[tuple[str, ...]]

    def count_event(self, count: StreamCount, event: bytes, hide_usage: bool, running_usage: bool) -> bytes | None:
        data = sse_data(event)
        if data is None:
            return event
        if not isinstance(data, dict):
            count.unreadable = True
            return event
        count.output = count.output or data.get("type") not in self.PREAMBLE
        self.take(count, data)
        return event

    def take(self, count: StreamCount, data: dict[str, Any]) -> None:
        """What one event says of the output's size."""
        raise NotImplementedError


def kind(status: int) -> str:
    """The OpenAI error type of an HTTP status."""
    return KINDS.get(status, "error")


def sse_data(event: bytes) -> Any:
    """An SSE event's JSON data (``...`` where its data is not JSON; None: it has no data)."""
    data = None
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data = (data or b"") + line[5:].lstrip(b" ")
    if data is None:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return ...


def estimate_tokens(value: Any) -> int:
    """4 characters of JSON per token, generously: admission needs a bound before tokenising."""
    return len(json.dumps(value, default=str)) // 4 + 1


def count(value: int) -> float:
    """A logprobs count as vLLM reads it: negative means the whole vocabulary."""
    return math.inf if value < 0 else value
