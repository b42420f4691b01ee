"""The gateway's link to Redis (limit state, nonces): one client per store, every call bounded, and
one record of whether Redis is answering, so that each store falls back to this process while it
is not, logs one line when an outage starts and one when it ends, and retries after a backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
CLOSE_SECONDS = 1.0
T = TypeVar("T")


def reason_of(exc: BaseException) -> str:
    """The ``reason`` label of a failed call: timeout, connection (refused, reset, unreachable) or error."""
    if isinstance(exc, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    return "error"


class RedisLink:
    """A Redis client whose calls are bounded (socket timeouts, then twice the timeout overall) and
    the outage state of this process's view of it. ``fallback`` says what happens meanwhile and
    ``counted`` what the fallback counts, in the two log lines."""

    def __init__(
        self,
        url: str,
        timeout: float,
        backoff: float,
        log: logging.Logger,
        what: str,
        fallback: str,
        counted: str,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.timeout, self.backoff, self.log = timeout, backoff, log
        self._what, self._fallback, self._counted, self._on_change = what, fallback, counted, on_change
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        kw = self.client.connection_pool.connection_kwargs
        self.where = f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"  # no password
        self.outage: str | None = None  # the reason while Redis is not answering
        self.fallbacks = 0  # calls answered by this process alone during the outage
        self._retry_at = 0.0
        self._since = 0.0

    def waiting(self) -> bool:
        """Inside the backoff after a failed call: Redis is not asked."""
        return time.monotonic() < self._retry_at

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """One call, bounded overall (connect + write + read) by twice the socket timeout; a failure
        starts (or extends) an outage and is raised."""
        try:
            async with asyncio.timeout(2 * self.timeout):
                result = await make()
        except ERRORS as exc:
            self.down(exc)
            raise
        self.up()
        return result

    def down(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self.backoff
        if self.outage is None:
            self.outage, self._since, self.fallbacks = reason_of(exc), time.monotonic(), 0
            if self._on_change is not None:
                self._on_change(False)
            self.log.warning(
                "%s %s not answering (%s: %s): %s until it does (retried every %g s)",
                self._what,
                self.where,
                self.outage,
                str(exc) or type(exc).__name__,
                self._fallback,
                self.backoff,
            )

    def up(self) -> None:
        if self.outage is not None:
            self.log.info(
                "%s %s answering again after %.1f s; %d %s by this process alone",
                self._what,
                self.where,
                time.monotonic() - self._since,
                self.fallbacks,
                self._counted,
            )
            self.outage = None
            if self._on_change is not None:
                self._on_change(True)

    async def close(self) -> None:
        with contextlib.suppress(*ERRORS):
            async with asyncio.timeout(CLOSE_SECONDS):
                await self.client.aclose()
