"""Per-request proxy KV state in a preallocated, bounded block pool.

Rows are keyed by the teacher batch's row index and follow vLLM's BatchUpdate operations (add,
remove, one-way move, swap). The pool is allocated once at start-up (its memory is not in vLLM's
budget) and never grows: a request that does not fit gets ``ProxyBudgetExceeded`` for itself only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from proxy_worker.config import ProxyConfig
from proxy_worker.model import KVStore


class ProxyBudgetExceeded(RuntimeError):
    """The proxy KV pool cannot hold this request; the request loses protection, nothing else."""


@dataclass
class RowState:
    """One request's token history (live sequences, read at step time) and its cached prefix."""

    prompt: Sequence[int]
    output: Sequence[int]
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    last_delta: torch.Tensor | None = None
    error: str | None = None

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
    """Block pool + row table. ``token_budget`` bounds the tokens held across all rows."""

    def __init__(
        self,
        cfg: ProxyConfig,
        copies: int,
        dtype: torch.dtype,
        token_budget: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
    ) -> None:
        if token_budget < block_size:
            raise ValueError(f"proxy token budget {token_budget} is below one block ({block_size})")
        self.block_size = block_size
        self.num_blocks = token_budget // block_size
        shape = (cfg.num_layers, copies, cfg.num_kv_heads, self.num_blocks * block_size, cfg.head_dim)
        self.store = KVStore(
            torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        )
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self.rows: dict[int, RowState] = {}

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def used_tokens(self) -> int:
        return (self.num_blocks - len(self._free)) * self.block_size

    @property
    def nbytes(self) -> int:
        return 2 * self.store.k.numel() * self.store.k.element_size()

    def add(self, index: int, prompt: Sequence[int], output: Sequence[int] = ()) -> None:
        """Start a row; an occupied index is replaced (its blocks are freed)."""
        self.remove(index)
        self.rows[index] = RowState(prompt=prompt, output=output)

    def remove(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None:
            self._release(row)

    def move(self, src: int, dst: int) -> None:
        """One-way move: the row at ``src`` now lives at ``dst``; whatever was at ``dst`` is dropped."""
        row = self.rows.pop(src, None)
        self.remove(dst)
        if row is not None:
            self.rows[dst] = row

    def swap(self, a: int, b: int) -> None:
        ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
        if ra is not None:
            self.rows[b] = ra
        if rb is not None:
            self.rows[a] = rb

    def rebuild(self, index: int) -> None:
        """Forget the cached prefix (e.g. after preemption); the next step recomputes it."""
        row = self.rows[index]
        self._release(row)
        row.error = None

    def reserve(self, row: RowState, length: int) -> None:
        """Make ``row`` able to hold ``length`` tokens, or raise without changing anything."""
        needed = -(-length // self.block_size) - len(row.blocks)
        if needed <= 0:
            return
        if needed > len(self._free):
            raise ProxyBudgetExceeded(
                f"proxy KV budget exhausted: a row of {length} tokens needs {needed} more blocks of "
                f"{self.block_size}, {len(self._free)} free of {self.num_blocks}"
            )
        row.blocks.extend(self._free.pop() for _ in range(needed))

    def slot_table(self, rows: Sequence[RowState], length: int) -> torch.Tensor:
        """[B, length] flat KV slots of positions 0..length-1 for each row (padding repeats slot 0)."""
        nblk = -(-length // self.block_size)
        table = torch.zeros(len(rows), nblk, dtype=torch.long)
        for i, row in enumerate(rows):
            blocks = row.blocks[:nblk]
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        slots = table[:, :, None] * self.block_size + torch.arange(self.block_size)
        return slots.view(len(rows), -1)[:, :length]

    def _release(self, row: RowState) -> None:
        self._free.extend(reversed(row.blocks))
        row.blocks = []
        row.computed = 0
        row.last_delta = None
