"""Per-request proxy KV state in a preallocated, bounded block pool with prefix sharing.

Rows are keyed by the teacher batch's row index and follow vLLM's BatchUpdate operations (add,
remove, one-way move, swap: a ``RowMap``). The pool is allocated once at start-up (its memory is
not in vLLM's budget) and never grows: a request that does not fit gets ``ProxyBudgetExceeded``
for itself only.

Full blocks are shared the way vLLM's prefix cache shares them: each is named by a chained
content digest (parent digest + its token ids), registered as soon as a row reserves it, and
reference-counted; a row that is added (or must recompute its prefix) takes the longest chain of
registered blocks, leaving at least its last token to compute. A block is freed with its last
reference. Both perturbed copies use one block table (each layer's store has a copy dimension: 2,
or 1 for a layer both copies share under a restricted Δ mode).

Sharing is scoped to a tenant: a row's chain starts from a root derived from its request's salt
(``chain_root``; the gateway salts each account's requests), so rows of different tenants never
share a block. Without that, a client could tell from a faster first token (or from the proxy pool
filling more slowly) that another tenant had sent a prompt with the same prefix. Unsalted rows
share among themselves, as vLLM's own prefix cache does without ``cache_salt``.

Ordering: a block registered in this step may not be written yet. A row reads the shared blocks
it took (``RowState.shared``) but only ever writes its own; it may run a pass only once every
block it took is *written* (its last position computed), see ``ready``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from antidistill.proxy_worker.core.config import ProxyConfig
from antidistill.proxy_worker.core.model import KVStore
from antidistill.proxy_worker.core.plan import PagedSlots
from antidistill.proxy_worker.runtime.failure_ledger import RowFailure
from antidistill.proxy_worker.runtime.rows import RowMap

ROOT = b"proxy-kv-root"  # the chain's root for unsalted rows


def chain_root(salt: str | None) -> bytes:
    """Where a row's digest chain starts: ``ROOT`` without a salt, else a digest of the salt in a
    blake2b domain of its own (``person``), so distinct salts get distinct roots and none of them is
    ``ROOT`` or the digest of a block."""
    if salt is None:
        return ROOT
    return hashlib.blake2b(salt.encode(), digest_size=32, person=b"proxy-kv-salt").digest()


def block_digest(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Chained content digest of a full block (blake2b, not Python's ``hash``), so a client cannot
    craft a different prefix that lands on another request's proxy KV."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=32).digest()


class ProxyBudgetExceeded(RuntimeError):
    """The proxy KV pool cannot hold this request; the request loses protection, nothing else."""


@dataclass
class RowState:
    """One request's token history (live sequences, read at step time) and its cached prefix.

    ``blocks[:shared]`` were taken from other rows (read-only here); ``digests[j]`` names full
    block j, in the chain that starts at ``root`` (the tenant's: ``chain_root``); ``computed``
    positions have their keys/values in the store.
    """

    prompt: Sequence[int]
    output: Sequence[int]
    root: bytes = ROOT
    blocks: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    shared: int = 0
    computed: int = 0
    last_delta: torch.Tensor | None = None
    error: RowFailure | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) across prompt and output without copying the whole history."""
        p = len(self.prompt)
        head = list(self.prompt[start:end]) if start < p else []
        tail = list(self.output[max(start - p, 0) : end - p]) if end > p else []
        return head + tail


class ProxyKVCache:
    """Block pool + row table. ``token_budget`` bounds the distinct tokens held across all rows."""

    def __init__(
        self,
        cfg: ProxyConfig,
        copies: int | Sequence[int],
        dtype: torch.dtype,
        token_budget: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
    ) -> None:
        if token_budget < block_size:
            raise ValueError(f"proxy token budget {token_budget} is below one block ({block_size})")
        self.block_size = block_size
        self.num_blocks = token_budget // block_size
        per_layer = [copies] * cfg.num_layers if isinstance(copies, int) else list(copies)
        if len(per_layer) != cfg.num_layers:
            raise ValueError(f"{len(per_layer)} layer copy counts for a proxy of {cfg.num_layers} layers")
        slots = self.num_blocks * block_size

        def layers() -> list[torch.Tensor]:
            return [
                torch.zeros(c, cfg.num_kv_heads, slots, cfg.head_dim, dtype=dtype, device=device) for c in per_layer
            ]

        self.store = KVStore(layers(), layers())
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self.refs = [0] * self.num_blocks
        self.written = [False] * self.num_blocks
        self._by_digest: dict[bytes, int] = {}
        self._digest_of: dict[int, bytes] = {}
        self.rows: RowMap[RowState] = RowMap(on_drop=lambda _index, row: self._release(row))

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_tokens(self) -> int:
        return (self.num_blocks - len(self._free)) * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def registered_blocks(self) -> int:
        return len(self._by_digest)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.store.k, *self.store.v))

    def add(self, index: int, prompt: Sequence[int], output: Sequence[int] = (), salt: str | None = None) -> None:
        """Start a row that shares blocks only with rows of the same ``salt``; an occupied index is
        replaced (its blocks are released)."""
        self.rows.add(index, RowState(prompt=prompt, output=output, root=chain_root(salt)))

    def remove(self, index: int) -> None:
        self.rows.remove(index)

    def move(self, src: int, dst: int) -> None:
        """One-way move: the row at ``src`` now lives at ``dst``; whatever was at ``dst`` is dropped."""
        self.rows.move(src, dst)

    def swap(self, a: int, b: int) -> None:
        self.rows.swap(a, b)

    def rebuild(self, index: int) -> None:
        """Forget the cached prefix (e.g. after preemption); the next step recomputes it."""
        row = self.rows[index]
        self._release(row)
        row.error = None

    def reserve(self, row: RowState, length: int) -> None:
        """Make ``row`` able to hold ``length`` tokens, or raise without changing anything.

        A row without blocks first takes the longest chain of registered blocks of its first
        ``length - 1`` tokens; every full block it then holds is registered for others to take.
        """
        taken, digests = ([], []) if row.blocks else self._match(row, length)
        needed = -(-length // self.block_size) - len(row.blocks) - len(taken)
        if needed > len(self._free):
            raise ProxyBudgetExceeded(
                f"proxy KV budget exhausted: a row of {length} tokens needs {needed} more blocks of "
                f"{self.block_size}, {len(self._free)} free of {self.num_blocks}"
            )
        if taken:
            for b in taken:
                self.refs[b] += 1
            row.blocks, row.digests, row.shared = taken, digests, len(taken)
            row.computed = len(taken) * self.block_size
        for _ in range(max(needed, 0)):
            b = self._free.pop()
            self.refs[b], self.written[b] = 1, False
            row.blocks.append(b)
        self._register(row, length)

    def ready(self, row: RowState) -> bool:
        """Whether every block ``row`` took from another row has been written."""
        return all(self.written[b] for b in row.blocks[: row.shared])

    def mark_written(self, row: RowState, start: int, end: int) -> None:
        """A pass wrote ``row``'s positions [start, end): its blocks whose last position lies there are complete."""
        for j in range(start // self.block_size, end // self.block_size):
            self.written[row.blocks[j]] = True

    def drop_unwritten(self) -> None:
        """After an interrupted step: release every row holding a full block nobody finished writing
        (its writer may never run), so no row waits on it and no one takes it."""
        for row in self.rows.values():
            if not all(self.written[b] for b in row.blocks[: len(row.digests)]):
                self._release(row)

    def paged(self, rows: Sequence[RowState]) -> PagedSlots:
        """The rows' block tables, for ``build_plan``."""
        return PagedSlots([row.blocks for row in rows], self.block_size, self.num_blocks)

    def slot_table(self, rows: Sequence[RowState], length: int) -> torch.Tensor:
        """[B, length] flat KV slots of positions 0..length-1 for each row (padding repeats slot 0)."""
        return self.paged(rows).slots(range(len(rows)), length)

    def _match(self, row: RowState, length: int) -> tuple[list[int], list[bytes]]:
        """The longest chain of registered blocks covering the first ``length - 1`` tokens."""
        blocks: list[int] = []
        digests: list[bytes] = []
        parent = row.root
        for j in range((length - 1) // self.block_size):
            parent = block_digest(parent, row.tokens(j * self.block_size, (j + 1) * self.block_size))
            block = self._by_digest.get(parent)
            if block is None:
                break
            blocks.append(block)
            digests.append(parent)
        return blocks, digests

    def _register(self, row: RowState, length: int) -> None:
        """Name the row's full blocks below ``length``; a digest already registered keeps its block."""
        bs = self.block_size
        for j in range(len(row.digests), length // bs):
            parent = row.digests[-1] if row.digests else row.root
            digest = block_digest(parent, row.tokens(j * bs, (j + 1) * bs))
            row.digests.append(digest)
            if digest not in self._by_digest:
                self._by_digest[digest] = row.blocks[j]
                self._digest_of[row.blocks[j]] = digest

    def _release(self, row: RowState) -> None:
        for b in reversed(row.blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free.append(b)
                self.written[b] = False
                digest = self._digest_of.pop(b, None)
                if digest is not None:
                    del self._by_digest[digest]
        row.blocks, row.digests, row.shared = [], [], 0
        row.computed = 0
        row.last_delta = None
