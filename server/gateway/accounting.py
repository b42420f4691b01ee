"""What one request did, from what vLLM returned: the response labels, the exact token counts, and
the one place a request ends — its audit line and its metrics.

Output is counted as it is sent, not from a usage event a client can avoid by closing the stream
one token early: every protected or unprotected stream runs with vLLM's continuous usage stats, so
each chunk carries its choice's running count (``stream_options.continuous_usage_stats``; stripped
again where the client did not ask for it). A stream whose chunks cannot be read is charged its
whole output budget; a JSON response is counted from its usage."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from antidistill.server.gateway import metrics
from antidistill.server.gateway.admission import Admission
from antidistill.server.gateway.guard import Watch
from antidistill.server.tiers import Caller
from starlette.types import Message, Send

Charge = Callable[[int], Awaitable[None]]
CHARGE_EVERY = 32  # output tokens between two charges of a running request against its limits


@dataclass
class Exchange:
    """One request as the audit line and the output count see it: who asked, what the gateway
    decided (None: refused before a decision), and what vLLM returned."""

    caller: Caller
    path: str
    start: float
    decision: Admission | None = None
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_text: Any = None
    charged: int = 0  # output already counted against the limits while the request ran
    body: bytearray = field(default_factory=bytearray)  # a JSON response; a stream's unfinished event
    choices: dict[int, int] = field(default_factory=dict)  # a stream's running output count per choice
    unreadable: bool = False  # a stream chunk whose count could not be read
    watch: Watch | None = None  # protected requests: what the worker reported

    @property
    def lam(self) -> float | None:
        return None if self.decision is None else self.decision.lam

    @property
    def stream(self) -> bool:
        return self.decision is not None and self.decision.stream

    @property
    def output_budget(self) -> int:
        """The most output it may produce: charged when what was sent cannot be read."""
        return 0 if self.decision is None else self.decision.output_budget


class Accounting:
    """The audit log and metrics of finished requests."""

    def __init__(self, audit_log: str, audit_text: bool) -> None:
        self.audit = _audit_logger(audit_log)
        self.audit_text = audit_text

    def labelled(self, send: Send, ex: Exchange, on_output: Charge | None = None) -> Send:
        """``send`` that labels the response with the tier and λ and counts what vLLM returned;
        ``on_output`` is told of output as it is sent (every ``CHARGE_EVERY`` tokens), before the
        client can drop it."""

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                labels = [
                    (b"x-antidistillation-tier", ex.caller.tier_name.encode()),
                    (b"x-antidistillation-lambda", f"{ex.lam:g}".encode()),
                ]
                strength = ex.decision.strength if ex.decision is not None else None
                if strength is not None:
                    labels.append((b"x-antidistillation-strength", f"{strength:.4g}".encode()))
                message["headers"] = [*message.get("headers", []), *labels]
            elif message["type"] == "http.response.body":
                message["body"] = count_output(ex, message.get("body", b""), not message.get("more_body"))
                if on_output is not None and ex.completion_tokens - ex.charged >= CHARGE_EVERY:
                    sent, ex.charged = ex.completion_tokens - ex.charged, ex.completion_tokens
                    await on_output(sent)
            await send(message)

        return wrapped

    def finish(self, ex: Exchange) -> None:
        """The one place a request ends: its audit line and its metrics."""
        tokens = ex.completion_tokens
        tier = ex.caller.tier_name or "none"
        decision = ex.decision
        escalated = decision is not None and decision.escalated
        metrics.record_request(tier, ex.status, ex.lam, tokens, escalated)
        watch = ex.watch
        failure, unprotected = None, 0
        if watch is not None and not watch.protected:
            failure = "unverifiable" if watch.unverifiable else (watch.reason.label if watch.reason else "error")
            unprotected = min(watch.failed_steps, tokens)  # steps served with Δ = 0 (degrade), 0 if refused at once
            metrics.record_protection_failure(tier, failure, watch.refuse, unprotected)
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "key_id": ex.caller.key_id,
            "tier": ex.caller.tier_name or None,
            "account": ex.caller.account,  # a key's account, or the one a trusted gateway signed
            "lambda": ex.lam,
            "strength": None if decision is None else decision.strength,
            "profile": None if decision is None else decision.profile,
            "escalated": escalated,
            "path": ex.path,
            "stream": ex.stream,
            "status": ex.status,
            "prompt_tokens": ex.prompt_tokens,
            "completion_tokens": tokens,
            "protected": None if watch is None else watch.protected,
            "protection_failure": failure,
            "refused": failure is not None and watch.refuse,
            "unprotected_tokens": unprotected,
            "latency_ms": round(1000 * (time.monotonic() - ex.start), 1),
        }
        if self.audit_text:
            line["prompt"] = ex.prompt_text
        self.audit.info(json.dumps(line))


def count_output(ex: Exchange, chunk: bytes, last: bool) -> bytes:
    """Count what vLLM returned: a JSON body (parsed once, at its last chunk) or a stream's events
    (the stream flag as vLLM parsed it says which). Stream events are passed on whole: a partial
    one waits for the rest of it."""
    if not ex.stream:
        ex.body.extend(chunk)
        if last:
            _take_usage(ex, bytes(ex.body))
        return chunk
    ex.body.extend(chunk)
    *events, rest = bytes(ex.body).split(b"\n\n")
    ex.body = bytearray(rest)
    kept = [e for e in (_count_event(ex, event) for event in events) if e is not None]
    out = b"".join(e + b"\n\n" for e in kept)
    if last:
        out += bytes(ex.body)
        ex.body.clear()
        if ex.unreadable:  # what was sent cannot be known: charge what it could have been
            ex.completion_tokens = max(ex.completion_tokens, ex.output_budget)
    return out


def _count_event(ex: Exchange, event: bytes) -> bytes | None:
    """One stream event as forwarded (None: dropped), its counts taken."""
    if not event.startswith(b"data: {"):
        return event
    try:
        data = json.loads(event[6:])
        usage, choices = data.get("usage"), data.get("choices")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        ex.unreadable = True
        return event
    if not isinstance(choices, list):  # an error event
        return event
    if not choices:  # the final usage event: the totals
        if isinstance(usage, dict):
            _set_usage(ex, usage)
        return None if ex.decision.hide_usage else event
    if not isinstance(usage, dict) or len(choices) != 1 or not isinstance(choices[0], dict):
        ex.unreadable = True
        return event
    completion = usage.get("completion_tokens")
    if isinstance(completion, int):
        ex.choices[int(choices[0].get("index") or 0)] = completion
        ex.completion_tokens = max(ex.completion_tokens, sum(ex.choices.values()))
    else:
        ex.unreadable = True
    if isinstance(usage.get("prompt_tokens"), int):
        ex.prompt_tokens = usage["prompt_tokens"]
    if ex.decision.running_usage:
        return event
    del data["usage"]
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def _take_usage(ex: Exchange, data: bytes) -> None:
    try:
        usage = json.loads(data).get("usage") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return
    if isinstance(usage, dict):
        _set_usage(ex, usage)


def _set_usage(ex: Exchange, usage: dict[str, Any]) -> None:
    """The totals of a usage object; never below what the stream's chunks already showed."""
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    ex.prompt_tokens = prompt if isinstance(prompt, int) else ex.prompt_tokens
    if isinstance(completion, int):
        ex.completion_tokens = max(completion, ex.completion_tokens)


def _audit_logger(path: str) -> logging.Logger:
    logger = logging.getLogger("antidistill.server.audit")
    if not logger.handlers:
        handler = logging.StreamHandler() if path == "-" else logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
