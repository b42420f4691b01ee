"""Limit state shared by every API-server process and replica through Redis (``--state redis://…``).

Admission is one EVALSHA (server/gateway/limits/scripts.py): every scope's windows and leases are checked and
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

from antidistill.server.gateway import metrics
from antidistill.server.gateway.config import check_state_url
from antidistill.server.gateway.limits.memory import (
    MINUTE,
    Grant,
    Lease,
    LocalLimits,
    MemoryState,
    Scope,
    new_lease,
    too_many,
)
from antidistill.server.gateway.limits.scripts import ADMIT, CHARGE, KEYS_PER_SCOPE, REFUSED, RELEASE, RENEW
from antidistill.server.gateway.redis_link import CLOSE_SECONDS, ERRORS, RedisLink

log = logging.getLogger("antidistill.server.state")
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
        self.link = RedisLink(
            url,
            timeout,
            backoff,
            log,
            "shared state",
            "limits and escalation fall back to this process (tiers' λ floors apply as always)",
            "requests were admitted",
            lambda up: metrics.set_state_mode("redis" if up else "local"),
        )
        self.client = self.link.client
        scripts = (ADMIT, CHARGE, RELEASE, RENEW)
        self._admit, self._charge, self._release, self._renew = map(self.client.register_script, scripts)
        self._active: dict[str, Lease] = {}
        self._owed: dict[tuple[str, ...], tuple[tuple[Scope, ...], int]] = {}  # scope ids → (scopes, tokens)
        self._renewer: asyncio.Task | None = None
        self._closing = asyncio.Event()
        metrics.set_state_mode("redis")

    def known_escalation(self, scopes: Sequence[Scope]) -> float | None:
        return self.local.escalation(scopes)

    async def admit(self, scopes: Sequence[Scope], budget: int, weight: int = 1) -> Grant:
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        if not self.link.waiting():
            lease = new_lease(scopes, budget, shared=True, weight=weight)
            with contextlib.suppress(*ERRORS):
                return self._granted(lease, await self._call(self._admit, _keys(scopes), self._admit_args(lease)))
        self.link.fallbacks += 1
        metrics.STATE_FALLBACKS.labels(self.link.outage or "error").inc()
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
        if self.link.waiting():  # its slots expire with the lease; its output waits
            self._owe(lease.scopes, output_tokens)
            return
        args = [self._now(), lease.id, max(int(output_tokens), 0), lease.budget, lease.weight, "1" if refund else "0"]
        args += [lease.admitted_ms, *_escalates(lease.scopes)]
        try:
            await self._call(self._release, _keys(lease.scopes), args)
        except ERRORS:
            self._owe(lease.scopes, output_tokens)

    def owed_tokens(self) -> int:
        """Output counted here that the store has not been told of yet (sent once it answers)."""
        return sum(tokens for _, tokens in self._owed.values())

    async def _store_charge(self, scopes: Sequence[Scope], output_tokens: int) -> None:
        if self.link.waiting():
            return self._owe(scopes, output_tokens)
        try:
            await self._call(self._charge, _keys(scopes), [self._now(), int(output_tokens), *_escalates(scopes)])
        except ERRORS:
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
        while self._owed and not self.link.waiting():
            scopes, tokens = self._owed.pop(next(iter(self._owed)))
            await self._store_charge(scopes, tokens)

    async def close(self) -> None:
        """Stop renewing and disconnect, bounded like every other call: the renewer also checks
        ``_closing`` between rounds, so it ends even where a client library swallows its cancellation."""
        self._closing.set()
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.wait({self._renewer}, timeout=CLOSE_SECONDS)
        await self.link.close()

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

    async def _call(self, script: Callable, keys: list[str], args: list) -> list:
        """One script call through the link (bounded; a failure starts an outage and is raised)."""
        return await self.link.call(lambda: script(keys=keys, args=args))

    async def _renew_forever(self) -> None:
        """Extend the leases of this process's running requests every third of a lease (first, off
        the request path, load the scripts so that no admission pays for NOSCRIPT)."""
        with contextlib.suppress(*ERRORS):
            async with asyncio.timeout(1.0):
                for script in (self._admit, self._charge, self._release, self._renew):
                    await self.client.script_load(script.script)
        while not await self._closed_within(self.lease_seconds / 3):
            if self.link.waiting():
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
            except ERRORS:
                continue  # the link started an outage; leases stay bounded by their TTL
            except Exception:  # the loop must survive anything; requests stay bounded by their TTL
                log.exception("lease renewal failed")

    async def _closed_within(self, seconds: float) -> bool:
        """Wait ``seconds`` or until ``close``; True once closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)
        return self._closing.is_set()


def _key(kind: str, scope: Scope) -> str:
    return f"{PREFIX}:{kind}:{scope.id}"


def _keys(scopes: Sequence[Scope]) -> list[str]:
    return [_key(kind, scope) for scope in scopes for kind in KEYS_PER_SCOPE]


def _escalates(scopes: Sequence[Scope]) -> list[str]:
    return ["1" if s.escalation else "0" for s in scopes]


def open_state(url: str | None, lease_seconds: float = 30.0, timeout: float = 0.1) -> MemoryState | RedisState:
    """The limit state for ``--state``: this process's memory without it, Redis with it."""
    return MemoryState() if url is None else RedisState(check_state_url(url), lease_seconds, timeout)
