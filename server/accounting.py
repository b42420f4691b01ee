"""What one request did, from what vLLM returned: the response labels, the exact token counts
(from the JSON usage or the stream's usage event, whatever the request said), and the one place a
request ends — its audit line and its metrics."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from antidistill.server import metrics
from antidistill.server.guard import Watch
from antidistill.server.tiers import Caller

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class Exchange:
    """What the audit line and the output-token count need to know about one request."""

    caller: Caller
    path: str
    start: float
    lam: float | None = None
    strength: float | None = None  # λ·s on the applied profile (None: its gradient stores no Δ scale)
    profile: str | None = None
    escalated: bool = False
    stream: bool = False
    hide_usage: bool = False  # we asked vLLM for the usage chunk; the client did not
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_text: Any = None
    body: bytearray = field(default_factory=bytearray)
    watch: Watch | None = None  # protected requests: what the worker reported


class Accounting:
    """The audit log and metrics of finished requests."""

    def __init__(self, audit_log: str, audit_text: bool) -> None:
        self.audit = _audit_logger(audit_log)
        self.audit_text = audit_text

    def labelled(self, send: Send, ex: Exchange) -> Send:
        """``send`` that labels the response with the tier and λ and counts what vLLM returned."""

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                labels = [
                    (b"x-antidistillation-tier", ex.caller.tier_name.encode()),
                    (b"x-antidistillation-lambda", f"{ex.lam:g}".encode()),
                ]
                if ex.strength is not None:
                    labels.append((b"x-antidistillation-strength", f"{ex.strength:.4g}".encode()))
                message["headers"] = [*message.get("headers", []), *labels]
            elif message["type"] == "http.response.body":
                message["body"] = count_output(ex, message.get("body", b""), not message.get("more_body"))
            await send(message)

        return wrapped

    def finish(self, ex: Exchange) -> None:
        """The one place a request ends: its audit line and its metrics."""
        tokens = ex.completion_tokens
        tier = ex.caller.tier_name or "none"
        metrics.record_request(tier, ex.status, ex.lam, tokens, ex.escalated)
        watch = ex.watch
        failure, unprotected = None, 0
        if watch is not None and not watch.protected:
            failure = "unverifiable" if watch.unverifiable else (watch.reason.label if watch.reason else "error")
            unprotected = 0 if watch.refuse else min(watch.failed_steps, tokens)
            metrics.record_protection_failure(tier, failure, watch.refuse, unprotected)
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "key_id": ex.caller.key_id,
            "tier": ex.caller.tier_name or None,
            "account": ex.caller.account,  # a key's account, or the one a trusted gateway signed
            "lambda": ex.lam,
            "strength": ex.strength,
            "profile": ex.profile,
            "escalated": ex.escalated,
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
    """Take usage from what vLLM returned: a JSON body (parsed once, at its last chunk) or the
    stream's usage event (the stream flag as vLLM parsed it says which); drop that event if we
    injected it. Chunks without usage pass untouched."""
    if not ex.stream:
        ex.body.extend(chunk)
        if last:
            _take_usage(ex, bytes(ex.body))
        return chunk
    if b'"usage"' not in chunk:
        return chunk
    kept = []
    for event in chunk.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"usage":{' in event.replace(b" ", b""):
            _take_usage(ex, event[6:])
            if ex.hide_usage and b'"choices":[]' in event.replace(b" ", b""):
                continue
        kept.append(event)
    return b"\n\n".join(kept)


def _take_usage(ex: Exchange, data: bytes) -> None:
    try:
        usage = json.loads(data).get("usage") or {}
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return
    ex.prompt_tokens = prompt if isinstance(prompt, int) else ex.prompt_tokens
    ex.completion_tokens = completion if isinstance(completion, int) else ex.completion_tokens


def _audit_logger(path: str) -> logging.Logger:
    logger = logging.getLogger("antidistill.server.audit")
    if not logger.handlers:
        handler = logging.StreamHandler() if path == "-" else logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
