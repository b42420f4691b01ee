"""Fail closed at the gateway: a protected request whose Δ the worker could not compute is refused.

The worker records a failing row's ticket in the failure ledger (proxy_worker/runtime/failure_ledger.py)
before that step's token is sampled, and withholds a row it refuses (its logits flattened) so
nothing it samples from then on carries the teacher. This module is the other half, in the
API-server process: ``FailureWatcher`` reads the ledger for the tickets of live requests (on every
response message, and every few milliseconds while any is live), and ``ProtectionGuard`` sits
between vLLM and the client for one request:

- the response start is held until the first body message, so a refusal found by then becomes a
  503 (400 for a token the proxy lacks) with the API's own error shape and ``Retry-After``;
- a stream refused later gets the API's error event and ends: no further tokens;
- a refused request is aborted in the engine (its receive channel reports a disconnect);
- a ``degrade`` request is refused only when the worker refused its row (a sticky failure, or more
  transient ones than it may be served through); until then its steps served with Δ = 0 are
  counted, as the worker last recorded them, and flagged (a header, or an SSE comment in-band).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field

from antidistill.proxy_worker.runtime.failure_ledger import FailureLedger, Reason, Record
from antidistill.proxy_worker.runtime.settings import MAX_TICKET
from antidistill.server.gateway.apis import Api, StreamCount, api_for
from antidistill.server.gateway.errors import respond
from starlette.types import Message, Receive, Send

log = logging.getLogger("antidistill.server.gateway")

POLL_SECONDS = 0.01
RETRY_AFTER = {Reason.BUDGET: 2, Reason.NON_FINITE: 1, Reason.ERROR: 5, Reason.BAD_ARGUMENTS: 30, Reason.VOCABULARY: 0}
WHY = {
    Reason.BUDGET: "the proxy's KV cache was full",
    Reason.NON_FINITE: "the proxy produced non-finite values",
    Reason.ERROR: "the proxy step failed",
    Reason.BAD_ARGUMENTS: "the engine could not read the request's protection settings",
    Reason.VOCABULARY: "the request holds a token id the proxy model does not have",
}
OVERFLOW = "the failure ledger overflowed, so this request's protection cannot be verified"
# an SSE comment (clients skip it) for a degrade-tier stream whose later tokens lost Δ
DEGRADED_EVENT = b": antidistillation protection degraded: the following tokens may be unprotected\n\n"


@dataclass
class Watch:
    """One protected request's ticket and what the worker said about it."""

    ticket: int
    refuse: bool  # refused at any failure (a refuse tier), or since the worker refused the row
    reason: Reason | None = None  # the refusal's, else the first failure's
    unverifiable: bool = False  # the ledger overflowed, or overwrote a record, while this request was live
    failed_steps: int = 0  # steps the worker served with Δ = 0: the largest count it recorded
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set once the request must be refused
    degraded: dict[int, Record] = field(default_factory=dict)  # seq → a record whose count may still grow

    @property
    def protected(self) -> bool:
        """Every emitted token had λ·Δ applied (what the audit line reports)."""
        return self.reason is None and not self.unverifiable

    @property
    def refused(self) -> bool:
        return self.stop.is_set()

    def take(self, record: Record) -> None:
        """What one of this request's ledger records says (again, when re-read)."""
        self.failed_steps = max(self.failed_steps, record.served)
        if self.reason is None or (record.refused and not self.refused):
            self.reason = record.reason
        self.refuse = self.refuse or record.refused
        if not record.refused:
            self.degraded[record.seq] = record
        self._check()

    def lost(self) -> None:
        """Some of this request's records (or their revisions) may be gone: its protection cannot be verified."""
        self.unverifiable = True
        self._check()

    def _check(self) -> None:
        if self.refuse and (self.reason is not None or self.unverifiable):
            self.stop.set()
            self.degraded.clear()

    def message(self) -> str:
        why = OVERFLOW if self.unverifiable else WHY[self.reason or Reason.ERROR]
        return f"antidistillation protection could not be applied ({why}); the request was stopped, not served raw"

    def retry_after(self) -> int:
        return 1 if self.unverifiable else RETRY_AFTER[self.reason or Reason.ERROR]

    def status(self) -> int:
        """400 where the request itself cannot be protected; 503 where the server could not do it."""
        return 400 if self.reason == Reason.VOCABULARY and not self.unverifiable else 503


class FailureWatcher:
    """The tickets of this process's live protected requests, matched against the ledger."""

    def __init__(self, ledger: FailureLedger | None) -> None:
        self.ledger = ledger
        self.live: dict[int, Watch] = {}
        self._poller: asyncio.Task | None = None

    def open(self, refuse: bool) -> Watch:
        if not self.live and self.ledger is not None:
            self.ledger.skip()  # idle: older records name no request of ours (other processes' may have wrapped)
        ticket = secrets.randbelow(MAX_TICKET) + 1
        watch = self.live[ticket] = Watch(ticket, refuse)
        if self.ledger is not None and (self._poller is None or self._poller.done()):
            self._poller = asyncio.get_running_loop().create_task(self._poll_while_live())
        return watch

    def close(self, watch: Watch) -> None:
        self.poll()
        self.live.pop(watch.ticket, None)

    def poll(self) -> None:
        """New records, then the degraded ones again (the worker revises their counts in place)."""
        if self.ledger is None:
            return
        batch = self.ledger.read()
        if batch.overflowed:
            log.error("failure ledger overflowed: %d live protected requests cannot be verified", len(self.live))
            for watch in self.live.values():
                watch.lost()
        for record in batch.records:
            watch = self.live.get(record.ticket)
            if watch is not None:
                watch.take(record)
        for watch in self.live.values():
            for record in list(watch.degraded.values()):
                current = self.ledger.reread(record)
                if current is None:  # the ring overwrote it: a later revision may be lost with it
                    del watch.degraded[record.seq]
                    watch.lost()
                else:
                    watch.take(current)

    async def _poll_while_live(self) -> None:
        while self.live:
            self.poll()
            await asyncio.sleep(POLL_SECONDS)


class ProtectionGuard:
    """The send/receive pair vLLM's app gets for one protected request (see the module docstring)."""

    def __init__(
        self,
        watch: Watch,
        watcher: FailureWatcher,
        send: Send,
        receive: Receive,
        api: Api | None = None,
        count: StreamCount | None = None,
    ) -> None:
        """``api``: whose error shapes a refusal takes (default: chat's); ``count``: what the stream
        showed so far (the Responses API numbers its events)."""
        self.watch, self.watcher = watch, watcher
        self._send, self._receive = send, receive
        self.api = api or api_for("/v1/chat/completions")
        self.count = count or self.api.new_count()
        self._start: Message | None = None
        self.started = False  # the client has the response start
        self.done = False  # the client's response is complete (or refused): drop the rest
        self.flagged = 0  # degrade: failed steps already announced to the client

    @property
    def refused(self) -> bool:
        return self.watch.refused

    async def receive(self) -> Message:
        """The app's receive channel, reporting a disconnect once the request is refused: vLLM aborts it."""
        if self.refused:
            return {"type": "http.disconnect"}
        inner = asyncio.ensure_future(self._receive())
        stop = asyncio.ensure_future(self.watch.stop.wait())
        done, _ = await asyncio.wait({inner, stop}, return_when=asyncio.FIRST_COMPLETED)
        if inner in done:
            stop.cancel()
            return inner.result()
        inner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await inner
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.done:
            return
        self.watcher.poll()
        if message["type"] == "http.response.start":
            self._start = message
            return
        if message["type"] != "http.response.body":
            return await self._send(message)
        if self.refused:
            return await self._refuse()
        if not self.started:
            await self._send_start()
        elif self.watch.failed_steps > self.flagged:  # a stream degraded after its headers: say so in-band
            self.flagged = self.watch.failed_steps
            await self._send({"type": "http.response.body", "body": DEGRADED_EVENT, "more_body": True})
        await self._send(message)
        if not message.get("more_body"):
            self.done = True

    async def finish(self) -> None:
        """After the app returned: a refused request that sent nothing gets its 503 now."""
        self.watcher.poll()
        if not self.done and self.refused:
            await self._refuse()

    async def _send_start(self) -> None:
        start = self._start or {"type": "http.response.start", "status": 200, "headers": []}
        if self.watch.failed_steps:
            self.flagged = self.watch.failed_steps
            start["headers"] = [*start.get("headers", []), (b"x-antidistillation-protection", b"degraded")]
        self.started = True
        await self._send(start)

    async def _refuse(self) -> None:
        """503 (400 for the request's own tokens) if nothing was sent yet; otherwise one error event
        that ends the stream."""
        self.done = True
        status, message = self.watch.status(), self.watch.message()
        if not self.started:
            self.started = True
            retry = [(b"retry-after", str(self.watch.retry_after()).encode())] if status == 503 else []
            return await respond(self._send, status, self.api.error_body(status, message), retry)
        chunk = self.api.stream_end(self.count, status, message)
        await self._send({"type": "http.response.body", "body": chunk, "more_body": False})
