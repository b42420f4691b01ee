"""Single-use nonces for trusted-gateway signatures (server/gateway/trusted_gateway.py).

A signed header set carries a nonce, and the server serves each nonce once while its signature could
still be accepted (the clock-skew window): captured headers cannot be replayed, with the same body or
another, on this replica or, with ``--state redis://…``, on any replica sharing that Redis.

Both stores are bounded. The memory store forgets a nonce when its TTL has passed and refuses to
remember more than ``max_entries`` at once (``NonceStoreFull``, which the verifier turns into a 503):
a burst that would fill it is refused rather than served unprotected or allowed to grow memory without
bound. The Redis store writes ``SET {antidistill}:nonce:<nonce> 1 NX PX <ttl>``: Redis expires the key, and
``NX`` makes the first claim win across replicas. Every Redis call is bounded (socket timeouts plus an
overall deadline, as server/gateway/limits/redis_state.py does); while Redis does not answer, this process's memory
store decides, with one log line per outage, so an outage never lets a nonce be used twice here.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import time
from collections.abc import Callable
from typing import Protocol

from antidistill.server.gateway.redis_link import ERRORS, RedisLink

log = logging.getLogger("antidistill.server.gateway.nonces")
PREFIX = "{antidistill}:nonce:"  # the limit state's hash tag: one Redis Cluster slot, one prefix to inspect
MAX_ENTRIES = 200_000  # ~6,000 signed requests per second per process at the default 30 s skew


class NonceStoreFull(Exception):
    """The memory store holds ``max_entries`` unexpired nonces: this request cannot be made single-use."""


class NonceStore(Protocol):
    async def claim(self, nonce: str, ttl_seconds: float) -> bool:
        """True the first time ``nonce`` is claimed within ``ttl_seconds``; False for a replay.
        Raises ``NonceStoreFull`` when the claim cannot be remembered."""
        ...


class MemoryNonces:
    """This process's nonces: a dict for lookups and a min-heap of expiries for trimming (TTLs differ
    per nonce, since each lasts until its own signature's timestamp leaves the window)."""

    def __init__(self, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._until: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        self._trim(self.clock())
        return len(self._until)

    async def claim(self, nonce: str, ttl_seconds: float) -> bool:
        return self.claim_now(nonce, ttl_seconds)

    def claim_now(self, nonce: str, ttl_seconds: float) -> bool:
        """``claim`` without awaiting: the memory store never waits, and the Redis store mirrors into it."""
        now = self.clock()
        self._trim(now)
        if nonce in self._until:
            return False
        if len(self._until) >= self.max_entries:
            raise NonceStoreFull(f"{len(self._until)} signed requests are held for the replay window")
        until = now + max(ttl_seconds, 0.0)
        self._until[nonce] = until
        heapq.heappush(self._expiries, (until, nonce))
        return True

    def _trim(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            until, nonce = heapq.heappop(self._expiries)
            if self._until.get(nonce) == until:
                del self._until[nonce]


class RedisNonces:
    """Nonces shared by every replica through Redis, with this process's ``MemoryNonces`` as the
    fallback while Redis does not answer and as a mirror of every claim made here (so a nonce
    claimed during an outage is still refused here once Redis is back)."""

    def __init__(self, url: str, timeout: float = 0.1, backoff: float = 1.0, local: MemoryNonces | None = None) -> None:
        self.local = local or MemoryNonces()
        self.link = RedisLink(
            url,
            timeout,
            backoff,
            log,
            "nonce store",
            "gateway nonces are single-use within this process only",
            "nonces were checked",
        )
        self.client, self.where = self.link.client, self.link.where

    async def claim(self, nonce: str, ttl_seconds: float) -> bool:
        if not self.link.waiting():
            ttl_ms = max(int(ttl_seconds * 1000), 1)
            try:
                fresh = await self.link.call(lambda: self.client.set(PREFIX + nonce, b"1", nx=True, px=ttl_ms))
            except ERRORS:
                pass
            else:
                with contextlib.suppress(NonceStoreFull):  # Redis decided; the mirror is best effort
                    return bool(fresh) and self.local.claim_now(nonce, ttl_seconds)
                return bool(fresh)
        self.link.fallbacks += 1
        return self.local.claim_now(nonce, ttl_seconds)

    async def close(self) -> None:
        await self.link.close()


def open_nonces(url: str | None, timeout: float = 0.1) -> MemoryNonces | RedisNonces:
    """The nonce store for ``--state``: this process's memory without it, Redis (its own client) with it."""
    return MemoryNonces() if url is None else RedisNonces(url, timeout)
