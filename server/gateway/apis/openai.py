"""OpenAI's completions and chat completions, as vLLM 0.32 reads them.

Their streams count exactly: the gateway runs every stream with vLLM's continuous usage stats, so
each chunk carries its choice's running output count (stripped again where the client did not ask
for it), and a dropped stream is charged what it got."""

from __future__ import annotations

import json
from typing import Any

from antidistill.server.gateway.apis.base import Api, Limits, StreamCount, count, estimate_tokens
from pydantic import BaseModel
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest


class _OpenAI(Api):
    def stream_fields(self, view: BaseModel) -> tuple[dict[str, Any], bool, bool]:
        options = view.stream_options
        asked = bool(options and options.include_usage)
        running = asked and bool(options.continuous_usage_stats)
        return {"stream_options": StreamOptions(include_usage=True, continuous_usage_stats=True)}, asked, running

    def new_count(self) -> StreamCount:
        return StreamCount(exact=True)  # every chunk carries its running count

    def count_event(self, count: StreamCount, event: bytes, hide_usage: bool, running_usage: bool) -> bytes | None:
        if not event.startswith(b"data: {"):
            return event
        try:
            data = json.loads(event[6:])
            usage, choices = data.get("usage"), data.get("choices")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            count.unreadable, count.exact = True, False
            return event
        if not isinstance(choices, list):  # an error event
            return event
        if not choices:  # the final usage event: the totals
            count.set_usage(usage)
            return None if hide_usage else event
        if not isinstance(usage, dict) or len(choices) != 1 or not isinstance(choices[0], dict):
            count.unreadable, count.exact = True, False
            return event
        completion = usage.get("completion_tokens")
        if isinstance(completion, int):
            count.choices[int(choices[0].get("index") or 0)] = completion
            count.completion = max(count.completion, sum(count.choices.values()))
        else:
            count.unreadable, count.exact = True, False
        if isinstance(usage.get("prompt_tokens"), int):
            count.prompt = usage["prompt_tokens"]
        if running_usage:
            return event
        del data["usage"]
        return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()

    def prompt_logprobs(self, view: BaseModel) -> float | None:
        """``prompt_logprobs``, else with ``echo`` the sampled-token count (``logprobs`` on
        completions, ``top_logprobs`` on chat, whose default 0 still scores the prompt)."""
        if view.prompt_logprobs is not None:
            return count(view.prompt_logprobs)
        if not view.echo:
            return None
        fallback = self._echo_logprobs(view)
        return None if fallback is None else count(fallback)

    def _echo_logprobs(self, view: BaseModel) -> int | None:
        raise NotImplementedError


class Completions(_OpenAI):
    route = "/v1/completions"
    name = "completions"
    model = CompletionRequest
    limits = Limits(("max_tokens",), "max_tokens")

    def sampled_logprobs(self, view: BaseModel) -> float | None:
        """``logprobs`` (-1: the whole vocabulary); each id in ``logprob_token_ids`` counts as one."""
        sampled = None if view.logprobs is None else count(view.logprobs)
        return _with_token_ids(view, sampled)

    def _echo_logprobs(self, view: BaseModel) -> int | None:
        return view.logprobs

    def prompt_tokens(self, view: BaseModel) -> list[int]:
        """Per prompt of a list (one per token id, else 4 characters per token)."""
        prompt = view.prompt
        parts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        return [len(p or "") // 4 + 1 if isinstance(p, str) or p is None else len(p) for p in parts]


class ChatCompletions(_OpenAI):
    route = "/v1/chat/completions"
    name = "chat"
    model = ChatCompletionRequest
    limits = Limits(("max_completion_tokens", "max_tokens"), "max_completion_tokens")

    def sampled_logprobs(self, view: BaseModel) -> float | None:
        """``top_logprobs`` with ``logprobs``; a ``top_logprobs`` without ``logprobs`` counts too
        (vLLM refuses it; never let it through)."""
        top = view.top_logprobs or 0
        return _with_token_ids(view, count(top) if view.logprobs or top else None)

    def _echo_logprobs(self, view: BaseModel) -> int | None:
        return view.top_logprobs

    def prompt_tokens(self, view: BaseModel) -> list[int]:
        return [estimate_tokens(view.messages)]


def _with_token_ids(view: BaseModel, sampled: float | None) -> float | None:
    if view.logprob_token_ids:
        return max(sampled or 0, len(view.logprob_token_ids))
    return sampled
