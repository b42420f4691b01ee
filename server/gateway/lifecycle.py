"""The server's lifecycle as the gateway sees it: in-flight requests, SIGTERM drain, SIGHUP reload,
and telling a requested stop from an engine death.

SIGTERM drains: new requests (and ``/health``) get 503, in-flight ones run to their end, then vLLM's
own shutdown runs (exit status 0). vLLM stops uvicorn and exits 0 when its engine process dies;
``stopped_without_signal`` lets ``antidistill serve`` turn that into exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("antidistill.server.gateway")

_served_app: list[Any] = []  # vLLM's FastAPI app, seen at lifespan start (its uvicorn server is on app.state)
_stop_signals: list[str] = []  # shutdown signals received, in order


def stopped_without_signal() -> bool:
    """The server ran and stopped although nobody asked it to; read after the server stopped."""
    return bool(_served_app) and not _stop_signals


def stop_server(reason: str) -> None:
    """Stop uvicorn the way vLLM's watchdog does; vLLM then shuts the engine down (exit status 0)."""
    _stop_signals.append(reason)
    server = getattr(getattr(_served_app[-1], "state", None), "server", None) if _served_app else None
    if server is None:
        raise KeyboardInterrupt(reason)  # no uvicorn server known: stop the event loop
    if len(_stop_signals) > 1:
        server.force_exit = True
    server.should_exit = True


class Lifecycle:
    """In-flight count and drain state; signal handlers installed on the first ASGI event."""

    def __init__(self, drain_timeout: float, reload: Callable[[], object]) -> None:
        self.drain_timeout = drain_timeout
        self.in_flight = 0
        self.draining = False
        self._installed = False
        # outside the main thread (in-process tests) no handler can be set; reload() still works
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGHUP, lambda *_: reload())

    def seen(self, scope: dict) -> None:
        """Every ASGI event passes here: remember vLLM's app, install our SIGTERM/SIGINT handlers."""
        if scope["type"] == "lifespan" and "app" in scope:
            _served_app.append(scope["app"])
        if not self._installed:
            self._install()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def _install(self) -> None:
        """Replace vLLM's SIGTERM/SIGINT handlers (an immediate stop of the engine) with ``drain`` and a
        graceful stop that we can tell apart from an engine death. Called on the first ASGI event
        (lifespan start), when vLLM's serve_http has already registered its own."""
        self._installed = True
        with contextlib.suppress(RuntimeError, ValueError):  # no loop signal handling (in-process tests)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self.drain)
            loop.add_signal_handler(signal.SIGINT, stop_server, "SIGINT")

    def drain(self) -> None:
        """SIGTERM: refuse new work with 503, let in-flight requests finish, then stop (a second
        SIGTERM, or the drain timeout, stops at once)."""
        if self.draining:
            log.warning("second SIGTERM: stopping now with %d requests in flight", self.in_flight)
            stop_server("SIGTERM")
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
        stop_server("SIGTERM")
