"""One attention group's mask as block lists over the paged KV store, for attention that reads the
store in place (``flex_attention.py``) instead of gathering each row's prefix every layer.

Per row and *query block* (``q_block`` consecutive grid queries) the lists name the physical KV
blocks the queries may read: *full* blocks (every key visible to every query of the block: no
mask is evaluated) and *partial* ones (the causal edge and the window's far edge, where the
mask decides key by key). ``logical`` maps each physical block back to its place in the row's
history, which is what the per-key mask needs; rows sharing a prefix list the same physical
blocks. It is the same function as the group's dense ``mask`` (plan.py), and tests compare them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Q_BLOCK = 32
"""Grid queries per query block: decode rows have one; a prefill chunk is cut into blocks of this many."""


MIN_ROWS, MIN_QUERIES = 4, 16
"""Smallest padded grid (a single query stays one: decode is its own bucket)."""


def bucket(n: int, least: int = 1) -> int:
    """The padded size of a dimension of ``n``: the next power of two, at least ``least``. The
    compiled kernel is specialised to static shapes (see ``flex_attention.py``), so padding bounds
    how many a process compiles; padded rows and query blocks read no keys."""
    return max(least, 1 << max(n - 1, 0).bit_length())


@dataclass(frozen=True)
class PagedBlocks:
    """Block lists of one group (int32 lists as FlexAttention's ``BlockMask`` takes them), on the
    group's grid padded to ``bucket`` sizes: [B, S] ⊇ the group's [b, s]; padding rows and query
    blocks read nothing.

    ``W`` (``width``) bounds the physical block ids the group reads: attention sees the store's
    first ``W · block_size`` slots, which is a view, not a copy.
    """

    query_index: torch.Tensor  # [B, S] index into the N new tokens (padding: token 0)
    query_valid: torch.Tensor  # [B, S] which cells are real queries (the group's cells, in its order)
    positions: torch.Tensor  # [B, S] absolute position of each grid query (padding repeats a valid one)
    logical: torch.Tensor  # [B, W] index in row b's history of physical block w; -1: not row b's
    kv_num_blocks: torch.Tensor  # [B, 1, QB] partial blocks per query block
    kv_indices: torch.Tensor  # [B, 1, QB, W] their physical ids (first kv_num_blocks are real)
    full_kv_num_blocks: torch.Tensor  # [B, 1, QB] full blocks per query block
    full_kv_indices: torch.Tensor  # [B, 1, QB, W]
    block_size: int
    q_block: int
    sliding_window: int | None

    @property
    def width(self) -> int:
        return self.logical.shape[1]

    def to(self, device: torch.device | str) -> PagedBlocks:
        names = (
            "query_index",
            "query_valid",
            "positions",
            "logical",
            "kv_num_blocks",
            "kv_indices",
            "full_kv_num_blocks",
            "full_kv_indices",
        )
        moved = {name: getattr(self, name).to(device) for name in names}
        return PagedBlocks(
            **moved, block_size=self.block_size, q_block=self.q_block, sliding_window=self.sliding_window
        )


def paged_blocks(
    tables: Sequence[Sequence[int]],
    block_size: int,
    query_index: torch.Tensor,
    positions: torch.Tensor,
    query_valid: torch.Tensor,
    lengths: Sequence[int],
    sliding_window: int | None,
    num_blocks: int | None = None,
    q_block: int = Q_BLOCK,
) -> PagedBlocks:
    """Block lists for rows with these block ``tables`` whose grid queries (``query_index`` [b, s]
    into the pass's tokens) sit at ``positions`` (``query_valid`` marks real ones) and whose
    histories are ``lengths`` long after the pass.

    A query at position p sees positions t ≤ p (and p − t < ``sliding_window``). Query blocks
    made only of padding read nothing. The lists span ``num_blocks`` physical blocks (the whole
    store), or without it the largest id the tables use.
    """
    query_index, positions, query_valid = _pad(query_index), _pad(positions, edge=True), _pad(query_valid)
    b, s = positions.shape
    counts = [-(-n // block_size) for n in lengths]
    for r, (table, n) in enumerate(zip(tables, counts, strict=True)):
        if len(table) < n:
            raise ValueError(f"row {r} holds {len(table)} KV blocks; its {lengths[r]} positions need {n}")
        if len(set(table[:n])) != n:
            raise ValueError(f"row {r} lists one KV block at two places of its history")
    nmax = max(counts)
    top = max(max(table[:n]) for table, n in zip(tables, counts, strict=True)) + 1
    if num_blocks is not None and top > num_blocks:
        raise ValueError(f"a block table names block {top - 1} of a store of {num_blocks} blocks")
    width = top if num_blocks is None else num_blocks
    pages = torch.zeros(b, nmax, dtype=torch.long)
    pages[: len(tables)] = torch.tensor([list(t[:n]) + [0] * (nmax - n) for t, n in zip(tables, counts, strict=True)])
    j = torch.arange(nmax)
    used = j[None, :] < torch.tensor(counts + [0] * (b - len(tables)))[:, None]
    logical = torch.full((b, width + 1), -1, dtype=torch.int32)
    logical.scatter_(1, torch.where(used, pages, width), j.to(torch.int32).expand(b, nmax).contiguous())

    first = torch.arange(0, s, q_block)
    last = torch.clamp(first + q_block, max=s) - 1
    lo_q, hi_q = positions[:, first, None], positions[:, last, None]  # [b, QB, 1]
    lo_k, hi_k = j * block_size, j * block_size + block_size - 1  # [nmax]
    touch = (lo_k <= hi_q) & query_valid[:, first, None]
    full = touch & (hi_k <= lo_q)
    if sliding_window is not None:
        touch &= hi_k > lo_q - sliding_window
        full &= lo_k > hi_q - sliding_window
    partial = touch & ~full
    kv_num, kv_idx = _compact(partial, pages, width)
    full_num, full_idx = _compact(full, pages, width)
    return PagedBlocks(
        query_index=query_index,
        query_valid=query_valid,
        positions=positions,
        logical=logical[:, :width].contiguous(),
        kv_num_blocks=kv_num,
        kv_indices=kv_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        block_size=block_size,
        q_block=q_block,
        sliding_window=sliding_window,
    )


def _pad(x: torch.Tensor, edge: bool = False) -> torch.Tensor:
    """[b, s] → [bucket(b), bucket(s)] (a single query stays one), zero (False) padded, or with
    ``edge`` each row's new columns repeating its last (a padded query keeps a valid position)."""
    b, s = x.shape
    out = x.new_zeros(bucket(b, MIN_ROWS), 1 if s == 1 else bucket(s, MIN_QUERIES))
    out[:b, :s] = x
    if edge:
        out[:b, s:] = x[:, -1:]
    return out


def _compact(selected: torch.Tensor, pages: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, QB, nmax] selection of logical blocks → (count [b, 1, QB], physical ids [b, 1, QB, W]),
    selected blocks first, in history order."""
    b, qb, nmax = selected.shape
    j = torch.arange(nmax)
    order = torch.argsort(torch.where(selected, j, nmax + j), dim=-1)
    ids = torch.zeros(b, qb, width, dtype=torch.int32)
    ids[..., :nmax] = pages[:, None, :].expand(b, qb, nmax).gather(2, order)
    return selected.sum(-1, dtype=torch.int32)[:, None], ids[:, None]
