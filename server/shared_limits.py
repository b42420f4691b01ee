"""Limit state shared by every API-server process and replica through Redis (``--state redis://…``).

Admission is one EVALSHA (server/limit_scripts.py): every scope's windows and leases are checked and
counted, and its escalation read, atomically. In-flight slots are leases with a TTL, renewed by one
background task per process while their requests run, so a replica that dies frees its slots
within one TTL. Every call is bounded (socket timeouts plus an overall deadline); when Redis does
not answer, this process's own limits (which mirror everything it admitted) decide, with one log
line per outage, a metric per request, and a retry after a short backoff. An escalation the store
reported is remembered locally, so an outage never lowers λ; a tier's own λ and floor apply anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import redis.asyncio as redis
from antidistill.server import metrics
from antidistill.server.config import check_state_url
from antidistill.server.limit_scripts import ADMIT, CHARGE, KEYS_PER_SCOPE, REFUSED, RELEASE, RENEW
from antidistill.server.limits import MINUTE, Grant, Lease, LocalLimits, MemoryState, Scope, new_lease, too_many
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("antidistill.server.state")
CLOSE_SECONDS = 1.0
PREFIX = "{antidistill}"  # one hash tag: a script's keys must share a Redis Cluster slot


class RedisState:
    """Limit state in Redis, falling back to ``LocalLimits`` while Redis is unreachable or slow."""

    def __init__(
        self,
        url: str,
        lease_seconds: float = 30.0,
        timeout: float = 0.1,
        backoff: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.local = LocalLimits(clock or time.monotonic)
        self.lease_seconds, self.timeout, self.backoff = lease_seconds, timeout, backoff
        self._clock = clock  # tests pin both clocks; else the scripts use the Redis server's
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        kw = self.client.connection_pool.connection_kwargs
        self.where = f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"  # no password
        scripts = (ADMIT, CHARGE, RELEASE, RENEW)
        self._admit, self._charge, self._release, self._renew = map(self.client.register_script, scripts)
        self._active: dict[str, Lease] = {}
        self._owed: dict[tuple[str, ...], tuple[tuple[Scope, ...], int]] = {}  # scope ids → (scopes, tokens)
        self._renewer: asyncio.Task | None = None
        self._closing = asyncio.Event()
        self._retry_at = 0.0
        self._outage: str | None = None  # the reason while Redis is not answering
        self._outage_since, self._fallbacks = 0.0, 0
        metrics.set_state_mode("redis")

    def known_escalation(self, scopes: Sequence[Scope]) -> float | None:
        return self.local.escalation(scopes)

    async def admit(self, scopes: Sequence[Scope], budget: int, weight: int = 1) -> Grant:
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        if time.monotonic() >= self._retry_at:
            lease = new_lease(scopes, budget, shared=True, weight=weight)
            try:
                reply = await self._call(self._admit, _keys(scopes), self._admit_args(lease))
            except (RedisError, OSError, TimeoutError) as exc:
                self._down(exc)
            else:
                self._up()
                return self._granted(lease, reply)
        self._fallbacks += 1
        metrics.STATE_FALLBACKS.labels(self._outage or "error").inc()
        lease = new_lease(scopes, budget, weight=weight)
        return Grant(lease, self.local.admit(scopes, budget, lease.id, weight=weight))

    async def charge(self, lease: Lease, output_tokens: int) -> None:
        self.local.charge(lease, output_tokens)
        if output_tokens > 0 and any(s.escalation for s in lease.scopes):
            await self._store_charge(lease.scopes, output_tokens)

    async def release(self, lease: Lease, output_tokens: int, refund: bool = False) -> None:
        self.local.release(lease, output_tokens, refund)
        if not lease.shared or self._active.pop(lease.id, None) is None:
            if output_tokens > 0 and any(s.escalation for s in lease.scopes):
                await self._store_charge(lease.scopes, output_tokens)  # admitted locally: still shared volume
            return
        if time.monotonic() < self._retry_at:  # its slots expire with the lease; its output waits
            self._owe(lease.scopes, output_tokens)
            return
        args = [self._now(), lease.id, max(int(output_tokens), 0), lease.budget, lease.weight, "1" if refund else "0"]
        args += [lease.admitted_ms, *_escalates(lease.scopes)]
        try:
            await self._call(self._release, _keys(lease.scopes), args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._down(exc)
            self._owe(lease.scopes, output_tokens)

    def owed_tokens(self) -> int:
        """Output counted here that the store has not been told of yet (sent once it answers)."""
        return sum(tokens for _, tokens in self._owed.values())

    async def _store_charge(self, scopes: Sequence[Scope], output_tokens: int) -> None:
        if time.monotonic() < self._retry_at:
            return self._owe(scopes, output_tokens)
        try:
            await self._call(self._charge, _keys(scopes), [self._now(), int(output_tokens), *_escalates(scopes)])
        except (RedisError, OSError, TimeoutError) as exc:
            self._down(exc)
            self._owe(scopes, output_tokens)

    def _owe(self, scopes: Sequence[Scope], output_tokens: int) -> None:
        """Keep output the store missed, one sum per set of scopes (bounded by the scopes in use), so
        an outage cannot hide volume from the other replicas' escalation."""
        if output_tokens > 0 and any(s.escalation for s in scopes):
            ids = tuple(s.id for s in scopes)
            owed = self._owed.get(ids, (tuple(scopes), 0))[1]
            self._owed[ids] = (tuple(scopes), owed + int(output_tokens))

    async def _flush(self) -> None:
        """Send the output owed since an outage (by the renewer, off the request path)."""
        while self._owed and time.monotonic() >= self._retry_at:
            scopes, tokens = self._owed.pop(next(iter(self._owed)))
            await self._store_charge(scopes, tokens)

    async def close(self) -> None:
        """Stop renewing and disconnect, bounded like every other call: the renewer also checks
        ``_closing`` between rounds, so it ends even where a client library swallows its cancellation."""
        self._closing.set()
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.wait({self._renewer}, timeout=CLOSE_SECONDS)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_SECONDS):
                await self.client.aclose()

    def _now(self) -> str:
        return "" if self._clock is None else str(int(self._clock() * 1000))

    def _admit_args(self, lease: Lease) -> list:
        args: list = [self._now(), lease.id, int(self.lease_seconds * 1000), lease.budget, lease.weight]
        for s in lease.scopes:
            rule = s.escalation
            args += [s.rpm or 0, s.tpm or 0, s.max_concurrent or 0]
            args += [rule.tokens_per_hour, int(rule.decay_minutes * MINUTE * 1000)] if rule else [0, 0]
        return args

    def _granted(self, lease: Lease, reply: list) -> Grant:
        scopes = lease.scopes
        if reply[0] == 0:
            _, index, kind, limit, retry_ms, used = (int(x) for x in reply)
            asked = lease.budget if REFUSED[kind] == "tpm" else lease.weight
            raise too_many(scopes[index - 1], REFUSED[kind], limit, retry_ms / 1000, used, asked)
        now_ms, untils = int(reply[1]), [int(x) for x in reply[2:]]
        for scope, until in zip(scopes, untils, strict=True):
            if scope.escalation is not None and until > now_ms:
                self.local.hold_escalation(scope.id, (until - now_ms) / 1000)
        lease = replace(lease, admitted_ms=now_ms)
        self._active[lease.id] = lease
        return Grant(lease, self.local.admit(scopes, lease.budget, lease.id, enforce=False, weight=lease.weight))

    async def _call(self, script: object, keys: list[str], args: list) -> list:
        """One script call, bounded overall (connect + write + read) by twice the socket timeout."""
        async with asyncio.timeout(2 * self.timeout):
            return await script(keys=keys, args=args)

    async def _renew_forever(self) -> None:
        """Extend the leases of this process's running requests every third of a lease (first, off
        the request path, load the scripts so that no admission pays for NOSCRIPT)."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(1.0):
                for script in (self._admit, self._charge, self._release, self._renew):
                    await self.client.script_load(script.script)
        while not await self._closed_within(self.lease_seconds / 3):
            if time.monotonic() < self._retry_at:
                continue
            await self._flush()
            if not self._active:
                continue
            keys, slots = [], []
            for lease in list(self._active.values()):
                for scope in lease.scopes:
                    if scope.max_concurrent is not None:
                        keys.append(_key("lease", scope))
                        slots += [lease.id, lease.weight]
            if not keys:
                continue
            try:
                await self._call(self._renew, keys, [self._now(), int(self.lease_seconds * 1000), *slots])
            except (RedisError, OSError, TimeoutError) as exc:
                self._down(exc)
            except Exception:  # the loop must survive anything; requests stay bounded by their TTL
                log.exception("lease renewal failed")
            else:
                self._up()

    async def _closed_within(self, seconds: float) -> bool:
        """Wait ``seconds`` or until ``close``; True once closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        return self._closing.is_set()

    def _down(self, exc: BaseException) -> None:
        reason = _reason(exc)
        self._retry_at = time.monotonic() + self.backoff
        if self._outage is None:
            self._outage, self._outage_since, self._fallbacks = reason, time.monotonic(), 0
            metrics.set_state_mode("local")
            log.warning(
                "shared state %s not answering (%s: %s): limits and escalation fall back to this process "
                "until it does (retried every %g s; tiers' λ floors apply as always)",
                self.where,
                reason,
                str(exc) or type(exc).__name__,
                self.backoff,
            )

    def _up(self) -> None:
        if self._outage is not None:
            log.info(
                "shared state %s answering again after %.1f s; %d requests were admitted by this process alone",
                self.where,
                time.monotonic() - self._outage_since,
                self._fallbacks,
            )
            self._outage = None
            metrics.set_state_mode("redis")


def _key(kind: str, scope: Scope) -> str:
    return f"{PREFIX}:{kind}:{scope.id}"


def _keys(scopes: Sequence[Scope]) -> list[str]:
    return [_key(kind, scope) for scope in scopes for kind in KEYS_PER_SCOPE]


def _escalates(scopes: Sequence[Scope]) -> list[str]:
    return ["1" if s.escalation else "0" for s in scopes]


def _reason(exc: BaseException) -> str:
    """The ``reason`` label: timeout, connection (refused, reset, unreachable) or error."""
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    return "error"


def open_state(url: str | None, lease_seconds: float = 30.0, timeout: float = 0.1) -> MemoryState | RedisState:
    """The limit state for ``--state``: this process's memory without it, Redis with it."""
    return MemoryState() if url is None else RedisState(check_state_url(url), lease_seconds, timeout)
