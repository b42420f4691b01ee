"""Protection failures, from the engine worker to the gateway: a ring of records in a shared file.

A logits processor cannot end a request, and the API-server process sees only the tokens that come
back. So the gateway gives each protected request a random ticket (``vllm_xargs.ad_ticket``); when
a row's Δ cannot be computed, the worker records it here *before* that step's token is sampled, and
the gateway looks for its tickets before it forwards any output (server/gateway/guard.py). The token
travels worker → engine core → API server through sockets, so the record is visible to the gateway
before the token is.

What a record says (its ``detail`` word: ``served << 1 | refused``): the row's ``reason``, how many
of its steps the worker has *served* with Δ = 0 so far (degrade mode; 0 for a row refused at its
first failure), and whether the worker now *withholds* the row, so the gateway must refuse the
request. A row writes one record per reason and *revises* it in place as its served count grows
(``revise``; a new one only if the ring has overwritten it), and one more when it is refused; the
gateway re-reads the records of its live requests (``reread``). So a row's failures cost a bounded
number of records however many steps fail, and the count the gateway reports is the worker's.
Under tensor parallelism every rank records the same failures: readers take the largest count.

Layout: a fixed number of 4-word records after an 8-word header, memory-mapped by every process
(one file per server start, path in ``ANTIDISTILL_FAILURE_LEDGER``). Writes take an exclusive
``flock`` (several tensor-parallel ranks or engines may write); readers never lock: each record
carries its sequence number, written last, so a reader tells a finished record from one being
written or already overwritten (a revision changes one word, atomically). A reader that fell a
whole ring behind cannot tell whose failure it missed and must treat every ticket it watches as
failed (``Batch.overflowed``).

The file decides which requests are refused, so it is created only where nothing was: never
through a symlink, never over (or by truncating) an existing file, readable by its owner only.
"""

from __future__ import annotations

import enum
import fcntl
import mmap
import os
import stat
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

    @property
    def transient(self) -> bool:
        """Whether a later step may have Δ again (a degrade-mode row may be served through it);
        the others last for the rest of the request: it lacks a token, lost its KV, or is unreadable."""
        return self in (Reason.NON_FINITE, Reason.ERROR)

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
    """One row's failure as the worker last wrote it (see the module docstring)."""

    ticket: int
    reason: Reason
    served: int = 0  # steps of the row served with Δ = 0 so far
    refused: bool = False  # the worker withholds the row: the request must be refused
    seq: int = 0  # where the record lives (``reread``)


def _detail(served: int, refused: bool) -> int:
    return served << 1 | int(refused)


@dataclass
class Batch:
    """Records a reader has not seen before; ``overflowed`` when some were lost to the ring."""

    records: list[Record] = field(default_factory=list)
    overflowed: bool = False


class LedgerPathTaken(FileExistsError):
    """Something (a file, a symlink) is already at the ledger's path: it is never reused or followed."""


def create(path: str | Path, records: int = DEFAULT_RECORDS) -> Path:
    """Write an empty ledger where nothing is (the server does this once, before the engine starts).

    ``O_EXCL`` with ``O_NOFOLLOW``: a symlink or file planted at the path is an error, never opened
    (a symlink would aim our writes, or the gateway's reads, at another file). Mode 0600 whatever
    the umask: another local user could otherwise read which requests failed, or write refusals.
    """
    path = Path(path)
    words = np.zeros(HEADER + records * WIDTH, dtype=np.int64)
    words[0], words[1] = MAGIC, records
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        kind = "a symlink" if path.is_symlink() else "something"
        raise LedgerPathTaken(
            f"{path}: {kind} is already there; a failure ledger is only created where nothing is "
            "(remove it, or name a fresh path)"
        ) from None
    try:
        os.fchmod(fd, 0o600)
        data = memoryview(words.tobytes())
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)
    return path


def recreate(path: str | Path, records: int = DEFAULT_RECORDS) -> Path:
    """``create``, after removing a ledger an earlier start of this user left at ``path`` (a
    restart with a fixed path). Only a regular file of ours that is a ledger is removed (unlinked,
    never truncated: a process still mapping it keeps its own copy); anything else stays and is an error."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # nothing there; or a symlink (ELOOP), or unreadable: create() refuses those
        return create(path, records)
    try:
        info = os.fstat(fd)
        ours = stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()
        head = os.read(fd, 8) if ours else b""
    finally:
        os.close(fd)
    if ours and head == np.int64(MAGIC).tobytes():
        path.unlink()
    return create(path, records)


class FailureLedger:
    """One process's view of the ledger file: ``append`` in the worker, ``read`` in the gateway."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        info = os.fstat(self._fd)
        size = info.st_size
        if not stat.S_ISREG(info.st_mode) or size < HEADER * 8:
            os.close(self._fd)
            raise ValueError(f"{self.path}: not an antidistillation failure ledger (not a regular file, or too short)")
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

    def append(self, ticket: int, reason: Reason, served: int = 0, refused: bool = False) -> int:
        """Write a record; returns its sequence number (for ``revise`` and ``reread``)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            head = int(self.words[2])
            base = self._base(head + 1)
            self.words[base] = 0  # invalid while being written
            self.words[base + 1 : base + WIDTH] = (ticket, int(reason), _detail(served, refused))
            self.words[base] = head + 1
            self.words[2] = head + 1
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        return head + 1

    def revise(self, seq: int, ticket: int, served: int) -> bool:
        """Raise the served count of record ``seq`` (not refused) in place; False when the ring has
        overwritten it (append a new one then)."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            base = self._base(seq)
            if int(self.words[base]) != seq or int(self.words[base + 1]) != ticket:
                return False
            self.words[base + 3] = _detail(served, False)
            return True
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
            base = self._base(self.cursor + 1)
            seq = int(self.words[base])
            record = self._record(base, seq)
            if seq == self.cursor + 1 and int(self.words[base]) == seq:
                batch.records.append(record)
            elif seq > self.cursor + 1:  # overwritten by a writer a whole ring ahead
                batch.overflowed = True
            else:  # still being written: take it on the next read
                break
            self.cursor += 1
        return batch

    def reread(self, record: Record) -> Record | None:
        """``record`` as it stands now (its served count may have grown), or None once overwritten."""
        base = self._base(record.seq)
        current = self._record(base, record.seq)
        if int(self.words[base]) != record.seq or current.ticket != record.ticket:
            return None
        return current

    def _base(self, seq: int) -> int:
        return HEADER + ((seq - 1) % self.capacity) * WIDTH

    def _record(self, base: int, seq: int) -> Record:
        ticket, reason, detail = (int(w) for w in self.words[base + 1 : base + WIDTH])
        return Record(ticket, Reason.of(reason), detail >> 1, bool(detail & 1), seq)

    def skip(self) -> None:
        """Forget what was appended so far (a reader with nothing to watch)."""
        self.cursor = int(self.words[2])

    def close(self) -> None:
        del self.words
        self._map.close()
        os.close(self._fd)
