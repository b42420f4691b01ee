"""The index tensors one forward pass needs: which tokens are new, where their keys/values live,
and which earlier positions each query may attend to.

Rows of different lengths and different numbers of new tokens (a chunk of prefill, one decode
token) are packed into one flat token list. For attention the rows are split into *groups* of
similar shape, each padded to its own [rows, queries, keys] grid: padding every row to the
longest chunk would make one 512-token prefill chunk cost every decode row 512 × keys scores.
Each row's padded grid is at most ``PAD_SLACK`` × its own ``queries × keys`` (see ``group_rows``),
so a pass's attention memory is proportional to the query-key pairs it really has.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from antidistill.proxy_worker.core.paged_blocks import PagedBlocks, paged_blocks

AttentionPath = Literal["reference", "flex", "auto"]
ATTENTION_PATHS: tuple[AttentionPath, ...] = ("reference", "flex", "auto")

FLEX_MIN_KEYS = 4096
"""``attention="auto"``: a decode group (one query per row) with at least this many key cells
(rows × its longest context, in whole blocks) reads the store in place; smaller groups and prefill
chunks gather. On this project's 2-core CPU (``make bench-proxy``) the compiled kernel's fixed cost
loses below it (1 row: 1.19–1.25× the gather's step time) and wins above (8 rows × 1k: 0.87×;
32 × 1k: 0.69×; 128 × 128: 0.89×)."""

PAD_SLACK = 2
"""A row's padded attention grid is at most this many times its own (queries × keys)."""


@dataclass(frozen=True)
class PagedSlots:
    """Per-row block tables of a paged KV store: position t of row b is slot
    ``tables[b][t // block_size] * block_size + t % block_size``. ``num_blocks`` is the store's
    size in blocks (None: unknown); the flex path's block lists span it, so their shapes do not
    change from step to step."""

    tables: Sequence[Sequence[int]]
    block_size: int
    num_blocks: int | None = None

    def blocks(self, rows: Sequence[int], length: int) -> torch.Tensor:
        """[len(rows), ⌈length / block_size⌉] block ids covering positions 0..length-1 (past a row's
        blocks: block 0)."""
        nblk = -(-length // self.block_size)
        return torch.tensor([_pad(self.tables[r], nblk) for r in rows], dtype=torch.long).view(len(rows), nblk)

    def slots(self, rows: Sequence[int], length: int) -> torch.Tensor:
        """[len(rows), length] slots of positions 0..length-1 (past a row's blocks: block 0)."""
        return self.slots_of(self.blocks(rows, length))[:, :length]

    def slots_of(self, blocks: torch.Tensor) -> torch.Tensor:
        """[b, nblk · block_size] the slots of every position the blocks [b, nblk] hold."""
        slots = blocks[:, :, None] * self.block_size + torch.arange(self.block_size)
        return slots.view(blocks.shape[0], -1)


def _pad(blocks: Sequence[int], n: int) -> list[int]:
    head = list(blocks[:n])
    return head + [0] * (n - len(head))


@dataclass(frozen=True)
class AttentionGroup:
    """Rows attended together on one padded grid (tensors on the model's device)."""

    query_index: torch.Tensor  # [b, S] index into the N new tokens (padding repeats a valid one)
    query_valid: torch.Tensor  # [b, S] which grid cells are real queries
    kv_index: torch.Tensor  # [b, T] where each row's keys/values live in the KV store
    mask: torch.Tensor  # [b, S, T] True where the query may attend to the key
    paged: PagedBlocks | None = None  # the same grid as block lists over the paged store (flex path)
    kv_blocks: torch.Tensor | None = None  # [b, T / block_size] the blocks kv_index spans (paged store)

    def to(self, device: torch.device | str) -> AttentionGroup:
        tensors = (x.to(device) for x in (self.query_index, self.query_valid, self.kv_index, self.mask))
        return AttentionGroup(
            *tensors,
            paged=None if self.paged is None else self.paged.to(device),
            kv_blocks=None if self.kv_blocks is None else self.kv_blocks.to(device),
        )

    @property
    def score_cells(self) -> int:
        """Query-key pairs on the padded grid (per copy and head)."""
        return self.mask.numel()

    @property
    def key_cells(self) -> int:
        return self.kv_index.numel()


@dataclass(frozen=True)
class StepPlan:
    """Everything position-dependent about one forward pass (all tensors on the model's device)."""

    tokens: torch.Tensor  # [N] new token ids, rows packed one after another
    positions: torch.Tensor  # [N] absolute position of each new token
    write_index: torch.Tensor  # [N] KV-store slot each new token's key/value is written to
    last_index: torch.Tensor  # [B] index into N of each row's newest token
    groups: tuple[AttentionGroup, ...]
    order: torch.Tensor | None  # [N] row of the concatenated group outputs holding token n; None: identity

    @property
    def num_rows(self) -> int:
        return self.last_index.shape[0]


def group_rows(queries: Sequence[int], keys: Sequence[int], slack: float = PAD_SLACK) -> list[list[int]]:
    """Partition rows into groups padded together, each row's padded area ≤ ``slack`` × its own.

    Rows are taken largest area (queries × keys) first and join the first group whose padded
    shape stays within ``slack`` × their own area; earlier members are larger, so their bound
    holds too. A uniform decode batch stays one group (one dense batched matmul), while a prefill
    chunk among decode rows gets a group of its own.
    """
    order = sorted(range(len(queries)), key=lambda i: queries[i] * keys[i], reverse=True)
    groups: list[list[int]] = []
    shapes: list[tuple[int, int]] = []
    for i in order:
        s, t = queries[i], keys[i]
        for g, (gs, gt) in enumerate(shapes):
            if max(gs, s) * max(gt, t) <= slack * s * t:
                groups[g].append(i)
                shapes[g] = (max(gs, s), max(gt, t))
                break
        else:
            groups.append([i])
            shapes.append((s, t))
    return [sorted(g) for g in groups]


def build_plan(
    new_tokens: Sequence[Sequence[int]],
    starts: Sequence[int],
    kv_slots: torch.Tensor | PagedSlots | None = None,
    sliding_window: int | None = None,
    device: torch.device | str = "cpu",
    attention: AttentionPath = "reference",
) -> StepPlan:
    """Plan a pass over ``new_tokens[b]`` appended at position ``starts[b]`` of row ``b``.

    ``kv_slots`` says where row b's position t lives in a paged KV store: a [B, ≥T] slot tensor
    or the rows' block tables. Without it the KV store is the pass's own keys/values (index =
    flat token index), which requires every row to start at 0: a full forward with no cache,
    used for ground truth, gradients and JVPs.

    ``attention="flex"`` with block tables adds each group's block lists (``AttentionGroup.paged``),
    so attention reads the store in place; ``"auto"`` does so for the decode groups big enough to
    gain (``FLEX_MIN_KEYS``); other plans and groups attend by the reference path. With block
    tables a group's key grid is a whole number of blocks (``AttentionGroup.kv_blocks``), so the
    reference path gathers whole blocks (block_size keys per index) instead of single slots; the
    mask hides the keys past each row's end.
    """
    if attention not in ATTENTION_PATHS:
        raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {attention!r}")
    counts = [len(t) for t in new_tokens]
    if min(counts, default=0) < 1:
        raise ValueError("every row in a step needs at least one new token")
    start = [int(s) for s in starts]
    if kv_slots is None and any(start):
        raise ValueError("a plan without a KV cache must start every row at position 0")
    lengths = [s + c for s, c in zip(start, counts, strict=True)]
    offsets = [0, *itertools.accumulate(counts)][:-1]
    groups, packed, writes, positions = [], [], [], []
    for rows in group_rows(counts, lengths):
        shape = _RowShape([counts[r] for r in rows], [start[r] for r in rows], [offsets[r] for r in rows])
        tmax = max(lengths[r] for r in rows)
        if isinstance(kv_slots, PagedSlots):  # whole blocks: the key grid is rounded up to them
            kv_blocks = kv_slots.blocks(rows, tmax)
            group, qpos = _group(shape, kv_slots.slots_of(kv_blocks), sliding_window)
            group = replace(group, kv_blocks=kv_blocks)
        else:
            group, qpos = _group(shape, _kv_index(kv_slots, rows, shape, tmax), sliding_window)
        kv_index = group.kv_index
        if isinstance(kv_slots, PagedSlots) and _reads_in_place(attention, group):
            group = replace(
                group, paged=_paged(kv_slots, rows, [lengths[r] for r in rows], group, qpos, sliding_window)
            )
        packed.append(group.query_index[group.query_valid])
        writes.append(kv_index.gather(1, qpos)[group.query_valid])
        positions.append(qpos[group.query_valid])
        groups.append(group.to(device))
    flat = torch.cat(packed)
    order = None if torch.equal(flat, torch.arange(flat.numel())) else torch.argsort(flat)
    tokens = torch.tensor([tok for row in new_tokens for tok in row], dtype=torch.long)
    return StepPlan(
        tokens=tokens.to(device),
        positions=_packed(positions, order).to(device),
        write_index=_packed(writes, order).to(device),
        last_index=torch.tensor([o + c - 1 for o, c in zip(offsets, counts, strict=True)], device=device),
        groups=tuple(groups),
        order=None if order is None else order.to(device),
    )


def _reads_in_place(attention: AttentionPath, group: AttentionGroup) -> bool:
    if attention == "auto":
        return group.query_index.shape[1] == 1 and group.key_cells >= FLEX_MIN_KEYS
    return attention == "flex"


def _paged(
    kv_slots: PagedSlots,
    rows: list[int],
    lengths: list[int],
    group: AttentionGroup,
    qpos: torch.Tensor,
    sliding_window: int | None,
) -> PagedBlocks:
    """The group's block lists over the paged store (for ``attention="flex"``)."""
    tables = [kv_slots.tables[r] for r in rows]
    grid = (group.query_index, qpos, group.query_valid)
    return paged_blocks(tables, kv_slots.block_size, *grid, lengths, sliding_window, kv_slots.num_blocks)


def _packed(per_group: list[torch.Tensor], order: torch.Tensor | None) -> torch.Tensor:
    """Per-group values (in group order) → packed token order."""
    flat = torch.cat(per_group)
    return flat if order is None else flat[order]


@dataclass(frozen=True)
class _RowShape:
    """New-token counts, start positions and packed offsets of one group's rows."""

    counts: list[int]
    starts: list[int]
    offsets: list[int]


def _kv_index(kv_slots: torch.Tensor | None, rows: list[int], shape: _RowShape, tmax: int) -> torch.Tensor:
    """[b, tmax] KV-store index of each row's positions (past a row's end: a valid slot, masked)."""
    if kv_slots is not None:
        return kv_slots[rows, :tmax].to("cpu", torch.long)
    t = torch.arange(tmax)
    off, cnt = torch.tensor(shape.offsets), torch.tensor(shape.counts)
    return off[:, None] + torch.minimum(t[None, :], cnt[:, None] - 1)


def _group(shape: _RowShape, kv_index: torch.Tensor, sliding_window: int | None) -> tuple[AttentionGroup, torch.Tensor]:
    """The padded [b, S, T] grid of one group, and each grid query's absolute position."""
    counts, start, offsets = (torch.tensor(x, dtype=torch.long) for x in (shape.counts, shape.starts, shape.offsets))
    s = torch.arange(int(counts.max()))
    query_valid = s[None, :] < counts[:, None]
    clamped = torch.minimum(s[None, :], counts[:, None] - 1)
    qpos = start[:, None] + clamped
    t = torch.arange(kv_index.shape[1])
    mask = t[None, None, :] <= qpos[:, :, None]
    if sliding_window is not None:
        mask &= (qpos[:, :, None] - t[None, None, :]) < sliding_window
    return AttentionGroup(offsets[:, None] + clamped, query_valid, kv_index, mask), qpos
