"""Protection failures, from the engine worker to the gateway: a ring of records in a shared file.

A logits processor cannot end a request, and the API-server process sees only the tokens that come
back. So the gateway gives each protected request a random ticket (``vllm_xargs.ad_ticket``); when
a row's Δ cannot be computed, the worker appends (ticket, reason) here *before* that step's token
is sampled, and the gateway looks for its tickets before it forwards any output (server/guard.py).
The token travels worker → engine core → API server through sockets, so the record is visible to
the gateway before the token is.

Layout: a fixed number of 4-word records after an 8-word header, memory-mapped by every process
(one file per server start, path in ``ANTIDISTILL_FAILURE_LEDGER``). Appends take an exclusive
``flock`` (several tensor-parallel ranks or engines may write); readers never lock: each record
carries its sequence number, written last, so a reader tells a finished record from one being
written or already overwritten. A reader that fell a whole ring behind cannot tell whose failure
it missed and must treat every ticket it watches as failed (``Batch.overflowed``).
"""

from __future__ import annotations

import enum
import fcntl
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ENV_VAR = "ANTIDISTILL_FAILURE_LEDGER"
MAGIC = 0x41444C4544474552  # "ADLEDGER"
HEADER, WIDTH = 8, 4  # header words; words per record: sequence, ticket, reason, detail
DEFAULT_RECORDS = 1 << 16


class Reason(enum.IntEnum):
    """Why a protected row's Δ was unavailable for a step (the metric and audit label is ``label``)."""

    BUDGET = 1
    NON_FINITE = 2
    ERROR = 3
    BAD_ARGUMENTS = 4
    VOCABULARY = 5  # the request holds a token the proxy has no embedding for

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def of(cls, code: int) -> Reason:
        try:
            return cls(code)
        except ValueError:
            return cls.ERROR


@dataclass(frozen=True)
class RowFailure:
    """Why one row has no Δ for a step: the reason the ledger and metrics record, and the message
    the worker's log shows."""

    reason: Reason
    message: str


@dataclass(frozen=True)
class Record:
    ticket: int
    reason: Reason
    detail: int  # the row's output length when it failed


@dataclass
class Batch:
    """Records a reader has not seen before; ``overflowed`` when some were lost to the ring."""

    records: list[Record] = field(default_factory=list)
    overflowed: bool = False


def create(path: str | Path, records: int = DEFAULT_RECORDS) -> Path:
    """Write an empty ledger (the server does this once, before the engine starts)."""
    path = Path(path)
    words = np.zeros(HEADER + records * WIDTH, dtype=np.int64)
    words[0], words[1] = MAGIC, records
    path.write_bytes(words.tobytes())
    return path


class FailureLedger:
    """One process's view of the ledger file: ``append`` in the worker, ``read`` in the gateway."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR)
        size = os.fstat(self._fd).st_size
        if size < HEADER * 8:
            os.close(self._fd)
            raise ValueError(f"{self.path}: not an antidistillation failure ledger (too short)")
        self._map = mmap.mmap(self._fd, size)
        self.words = np.frombuffer(self._map, dtype=np.int64)
        if int(self.words[0]) != MAGIC or size != (HEADER + int(self.words[1]) * WIDTH) * 8:
            raise ValueError(f"{self.path}: not an antidistillation failure ledger")
        self.capacity = int(self.words[1])
        self.cursor = int(self.words[2])  # a reader starts at the present: older failures are not its own

    @classmethod
    def from_env(cls) -> FailureLedger | None:
        path = os.environ.get(ENV_VAR)
        return cls(path) if path else None

    def append(self, ticket: int, reason: Reason, detail: int = 0) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            head = int(self.words[2])
            base = HEADER + (head % self.capacity) * WIDTH
            self.words[base] = 0  # invalid while being written
            self.words[base + 1 : base + WIDTH] = (ticket, int(reason), detail)
            self.words[base] = head + 1
            self.words[2] = head + 1
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def read(self) -> Batch:
        """Records appended since this reader's last call."""
        head = int(self.words[2])
        batch = Batch()
        if head - self.cursor > self.capacity:
            batch.overflowed = True
            self.cursor = head - self.capacity
        while self.cursor < head:
            base = HEADER + (self.cursor % self.capacity) * WIDTH
            seq = int(self.words[base])
            ticket, reason, detail = (int(w) for w in self.words[base + 1 : base + WIDTH])
            if seq == self.cursor + 1 and int(self.words[base]) == seq:
                batch.records.append(Record(ticket, Reason.of(reason), detail))
            elif seq > self.cursor + 1:  # overwritten by a writer a whole ring ahead
                batch.overflowed = True
            else:  # still being written: take it on the next read
                break
            self.cursor += 1
        return batch

    def skip(self) -> None:
        """Forget what was appended so far (a reader with nothing to watch)."""
        self.cursor = int(self.words[2])

    def close(self) -> None:
        del self.words
        self._map.close()
        os.close(self._fd)
