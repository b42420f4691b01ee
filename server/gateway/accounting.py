"""What one request did, from what vLLM returned: the response labels, the exact token counts, and
the one place a request ends — its audit line and its metrics.

Output is counted as it is sent, not from a usage event a client can avoid by closing the stream
one token early: each API's stream says how (server/gateway/apis/: OpenAI streams carry a running
count; Responses and Messages streams only a final usage). A stream that sent output but ends
without an exact count, or whose events cannot be read, is charged its whole output budget (and its
audit line says the count is an estimate); a JSON response is counted from its usage."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from antidistill.server.gateway import metrics
from antidistill.server.gateway.admission import Admission
from antidistill.server.gateway.apis import Api, StreamCount, api_for, errors_for
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
    prompt_text: Any = None
    charged: int = 0  # output already counted against the limits while the request ran
    body: bytearray = field(default_factory=bytearray)  # a JSON response; a stream's unfinished event
    count: StreamCount = field(init=False)  # what the response showed of its size
    estimated: bool = False  # the output count is the budget charged, not a count
    watch: Watch | None = None  # protected requests: what the worker reported

    def __post_init__(self) -> None:
        self.count = self.api.new_count()

    @property
    def api(self) -> Api:
        return errors_for(self.path)

    @property
    def prompt_tokens(self) -> int:
        return self.count.prompt

    @property
    def completion_tokens(self) -> int:
        return self.count.completion

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
        settle(ex)
        tokens = ex.completion_tokens
        tier = ex.caller.tier_name or "none"
        decision = ex.decision
        escalated = decision is not None and decision.escalated
        api = ex.api.name if api_for(ex.path) is not None else "other"
        metrics.record_request(tier, ex.status, ex.lam, tokens, escalated, api)
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
            "api": api,
            "stream": ex.stream,
            "status": ex.status,
            "prompt_tokens": ex.prompt_tokens,
            "completion_tokens": tokens,
            "completion_estimated": ex.estimated,
            "protected": None if watch is None else watch.protected,
            "protection_failure": failure,
            "refused": failure is not None and watch.refuse,
            "unprotected_tokens": unprotected,
            "latency_ms": round(1000 * (time.monotonic() - ex.start), 1),
            "pid": os.getpid(),  # which API server (--api-server-count) answered
        }
        if self.audit_text:
            line["prompt"] = ex.prompt_text
        self.audit.info(json.dumps(line))


def count_output(ex: Exchange, chunk: bytes, last: bool) -> bytes:
    """Count what vLLM returned: a JSON body (parsed once, at its last chunk) or a stream's events
    (the stream flag as vLLM parsed it says which). Stream events are passed on whole: a partial
    one waits for the rest of it."""
    ex.body.extend(chunk)
    if not ex.stream:
        if last:
            _take_usage(ex, bytes(ex.body))
        return chunk
    *events, rest = bytes(ex.body).split(b"\n\n")
    ex.body = bytearray(rest)
    hide, running = ex.decision.hide_usage, ex.decision.running_usage
    kept = [e for e in (ex.api.count_event(ex.count, event, hide, running) for event in events) if e is not None]
    out = b"".join(e + b"\n\n" for e in kept)
    if last:
        out += bytes(ex.body)
        ex.body.clear()
    return out


def settle(ex: Exchange) -> None:
    """A stream that sent output without an exact count is charged what it could have been."""
    count = ex.count
    if ex.stream and ex.status == 200 and not count.exact and (count.output or count.unreadable):
        count.completion = max(count.completion, ex.output_budget)
        ex.estimated = True


def _take_usage(ex: Exchange, data: bytes) -> None:
    try:
        usage = json.loads(data).get("usage")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return
    ex.count.set_usage(usage)


def _audit_logger(path: str) -> logging.Logger:
    logger = logging.getLogger("antidistill.server.audit")
    if not logger.handlers:
        handler = logging.StreamHandler() if path == "-" else logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
