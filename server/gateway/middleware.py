"""ASGI middleware in front of vLLM's OpenAI app: the gateway's router. Each concern lives in its
own module; this one only puts them in order for a request:

    route allow-list → credentials (one caller) → body (bounded) → request (vLLM's own parser)
    → admission (tier policy, λ) → guard (fail closed) → accounting (labels, counts, audit)

The same path serves every client API (server/gateway/apis/: completions, chat, Responses,
Anthropic Messages); an API differs only in how vLLM reads it, its error shape and its stream.

Only the routes in ``EXPOSED`` are reachable; everything else vLLM mounts answers 404 (see
docs/security.md). ``/health`` and ``/ping`` need no key (orchestrators probe them; they carry no
model output); ``/metrics`` needs the metrics key, which no API key is (its counters follow every
tenant's traffic: server/gateway/metrics_key.py); everything else needs a key or an ``anonymous`` tier.
Lifecycle (drain on SIGTERM, reload on SIGHUP) is server/gateway/lifecycle.py; configuration is one
``GatewayConfig`` (server/gateway/config.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from functools import partial

from antidistill.proxy_worker.runtime.failure_ledger import FailureLedger
from antidistill.proxy_worker.runtime.logs import use_vllm_logging
from antidistill.server.gateway.accounting import Accounting, Exchange
from antidistill.server.gateway.apis import APIS, api_for, errors_for
from antidistill.server.gateway.apis.responses import not_found
from antidistill.server.gateway.body import read_body, replay, served_max_model_len
from antidistill.server.gateway.config import GatewayConfig
from antidistill.server.gateway.credentials import bearer
from antidistill.server.gateway.errors import Refusal, error_body, respond
from antidistill.server.gateway.gate import Gate, Requested
from antidistill.server.gateway.guard import FailureWatcher, ProtectionGuard
from antidistill.server.gateway.lifecycle import Lifecycle
from antidistill.server.gateway.limits.redis_state import open_state
from antidistill.server.gateway.metrics import serve_metrics
from antidistill.server.gateway.metrics_key import METRICS_PATH
from antidistill.server.gateway.nonces import open_nonces
from antidistill.server.gateway.policy import LAMBDA_HEADER, STRENGTH_HEADER
from antidistill.server.gateway.request import parse
from antidistill.server.gateway.tier_checks import load_servable
from antidistill.server.gateway.trusted_gateway import GatewayVerifier
from antidistill.server.tiers import Caller, TiersError, hash_key
from starlette.types import Receive, Scope, Send

log = logging.getLogger("antidistill.server.gateway")

OPEN = ("/health", "/ping")
EXPOSED = (*APIS, *OPEN, METRICS_PATH, "/v1/models", "/version", "/v1/messages/count_tokens")
STORED = re.compile(r"/v1/responses/([^/]+)(/cancel)?")  # a stored response: its owner's only
INLINE_PARSE_BYTES = 64 * 1024  # one parse, with vLLM's model for the route: larger bodies off the event loop


class AntidistillationMiddleware:
    """Configured by ``antidistill serve`` (``GatewayConfig``): vLLM builds middleware itself."""

    def __init__(self, app: Callable, config: GatewayConfig | None = None) -> None:
        self.app = app
        self.config = config or GatewayConfig.from_env()
        self.tiers = load_servable(self.config.tiers, self.config.scales, self.config.engine)
        limits = open_state(self.config.state, self.config.state_lease_seconds, self.config.state_timeout)
        self.gate = Gate(limits, self.config.tenant_salt_key, self.config.refuse_seeds)
        secret = self.config.gateway_secret
        nonces = open_nonces(self.config.state, self.config.state_timeout) if secret else None
        self.gateway = GatewayVerifier(secret, self.config.gateway_max_skew, nonces=nonces) if secret else None
        self.watcher = FailureWatcher(FailureLedger(self.config.ledger))
        self.accounting = Accounting(self.config.audit_log, self.config.audit_text)
        self.lifecycle = Lifecycle(self.config.drain_timeout, self.reload)
        use_vllm_logging("antidistill.server")

    def reload(self) -> bool:
        """Re-read the tiers file and run the start-up checks on it (server/gateway/tier_checks.py); a file
        that fails any keeps the old table (in-flight requests are untouched)."""
        try:
            self.tiers = load_servable(self.tiers.source, self.tiers.scales, self.config.engine)
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.lifecycle.seen(scope)
        if scope["type"] == "websocket":  # none is exposed (vLLM's /v1/realtime would bypass auth)
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == METRICS_PATH:  # also while draining: the scraper sees the drain through
            return await serve_metrics(self.app, scope, receive, send, self.config.metrics_key)
        if self.lifecycle.draining:
            message = "server is shutting down; retry on another replica"
            extra = [(b"retry-after", b"1"), (b"connection", b"close")]
            return await respond(send, 503, error_body(503, message), extra)
        if path in OPEN:
            return await self.app(scope, receive, send)
        stored = STORED.fullmatch(path)
        if path not in EXPOSED and stored is None:
            return await respond(send, 404, error_body(404, f"{path} is not exposed by this server"))
        caller = await self._authenticate(scope, send)
        if caller is None:
            return
        if api_for(path) is None or scope["method"] != "POST":
            return await self._pass(scope, receive, send, caller, stored and stored.group(1))
        await self._generate(scope, receive, send, caller)

    async def _pass(
        self, scope: Scope, receive: Receive, send: Send, caller: Caller, stored: str | None = None
    ) -> None:
        """A route vLLM answers as it is (GET /v1/models), or a ``stored`` response's, which only
        its owner reaches. In trusted-gateway mode its body (normally none) is read and bound to the
        signature first, so that no signed header set is served twice on any route; a refusal is
        sent and audited as in ``_generate``."""
        try:
            if stored is not None and not self.gate.owner(caller).owns(stored):
                raise not_found(stored)
            if self.gateway is not None:
                raw = await read_body(receive, scope, self.config.max_body_bytes)
                await self.gateway.bind(scope, raw)
                receive = replay(raw, receive)
        except Refusal as err:
            return await self._refuse(send, Exchange(caller, scope["path"], time.monotonic()), err)
        await self.app(scope, receive, send)

    async def _refuse(self, send: Send, ex: Exchange, err: Refusal) -> None:
        """Answer a refusal in the route's API's error shape (with Retry-After where waiting helps) and audit it."""
        ex.status = err.status
        extra = [(b"retry-after", str(err.retry_after).encode())] if err.retry_after else []
        await respond(send, err.status, errors_for(ex.path).error_body(err.status, err.message, err.param), extra)
        self.accounting.finish(ex)

    async def _authenticate(self, scope: Scope, send: Send) -> Caller | None:
        """The caller of the request's one credential; None once a refusal (400: more than one
        credential, 401: none valid) has been sent and audited. In trusted-gateway mode the one
        credential is the gateway's signature; Authorization (the gateway's own key) is not read."""
        key, status = None, 401
        try:
            if self.gateway is not None:
                return self.gateway.identify(scope, self.tiers)
            key = bearer(scope)
            caller = self.tiers.identify(key)
            if caller is not None:
                return caller
            message = "missing API key" if key is None else "invalid or revoked API key"
        except Refusal as err:
            status, message = err.status, err.message
        body = errors_for(scope["path"]).error_body(status, message)
        await respond(send, status, body, [(b"www-authenticate", b"Bearer")] * (status == 401))
        stranger = Caller(hash_key(key)[:12] if key else "none", "", None)
        self.accounting.finish(Exchange(stranger, scope["path"], time.monotonic(), status=status))
        return None

    async def _generate(self, scope: Scope, receive: Receive, send: Send, caller: Caller) -> None:
        ex = Exchange(caller, scope["path"], time.monotonic())
        try:
            raw = await read_body(receive, scope, self.config.max_body_bytes)
            if self.gateway is not None:  # the exact bytes received, before anything is decided on them
                await self.gateway.bind(scope, raw)
            big = len(raw) > INLINE_PARSE_BYTES  # parsed off the event loop (Redis deadlines, other streams)
            parsed = await asyncio.to_thread(parse, ex.path, raw) if big else parse(ex.path, raw)
            decision, lease = await self.gate.admit(
                parsed, caller, self.tiers, requested(scope), served_max_model_len(scope)
            )
        except Refusal as err:
            return await self._refuse(send, ex, err)
        ex.decision = decision
        if decision.lam:  # protected: the worker reports a step without Δ under this ticket
            ex.watch = self.watcher.open(refuse=decision.args.on_failure == "refuse")
        body = decision.body(ticket=None if ex.watch is None else ex.watch.ticket)
        if self.accounting.audit_text:
            ex.prompt_text = body.get("messages") or body.get("prompt") or body.get("input")
        payload = json.dumps(body).encode()
        headers_out = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers_out, (b"content-length", str(len(payload)).encode())]}
        labelled = self.accounting.labelled(send, ex, partial(self.gate.limits.charge, lease))
        try:
            with self.lifecycle.request():
                if ex.watch is None:
                    await self.app(scope, replay(payload, receive), labelled)
                else:
                    channel = replay(payload, receive)
                    guard = ProtectionGuard(ex.watch, self.watcher, labelled, channel, ex.api, ex.count)
                    await self.app(scope, guard.receive, guard.send)
                    await guard.finish()
        finally:
            if ex.watch is not None:
                self.watcher.close(ex.watch)
            self.accounting.finish(ex)
            await self.gate.limits.release(lease, ex.completion_tokens - ex.charged)


def requested(scope: Scope) -> Requested:
    """The client's λ and strength request headers."""
    return Requested(header(scope, LAMBDA_HEADER), header(scope, STRENGTH_HEADER))


def header(scope: Scope, name: str) -> str | None:
    """A request header whose repeated copies must agree (latin-1: HTTP allows obs-text)."""
    values = {v.decode("latin-1") for k, v in scope["headers"] if k.decode("latin-1").lower() == name}
    if len(values) > 1:
        raise Refusal(400, f"{len(values)} different {name} headers: send one", name)
    return next(iter(values), None)
