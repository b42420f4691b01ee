"""Attention that reads the paged proxy KV store in place: torch's FlexAttention, compiled, over the
block lists of ``paged_blocks.py``.

The reference path (``model.group_attention``) gathers every row's prefix into a contiguous copy
each layer. Here the store itself is the key/value sequence: a row's queries read only the
physical blocks its lists name (the sparsity is the paging), and the mask maps a physical slot
back to its position in the row's history, the way torch's experimental ``PagedAttention``
helper remaps a logical block mask. Both copies run in one call: the store's copy and head
dimensions fold into FlexAttention's head dimension ([C, Hkv, slots, D] viewed as
[1, C·Hkv, slots, D], broadcast over the rows), so query head (c, h) reads kv head (c, h // g)
exactly as grouped-query attention does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from antidistill.proxy_worker.core.paged_blocks import PagedBlocks
from antidistill.proxy_worker.core.plan import AttentionGroup
from torch.nn.attention.flex_attention import BlockMask, flex_attention

_compiled: Callable[..., torch.Tensor] | None = None
RECOMPILE_LIMIT = 256
"""Compiled kernels per process: one per (rows, queries) bucket, window and dtype seen."""


def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention)`` with static shapes, built once per process.

    Shapes are padded to buckets (``paged_blocks.bucket``) so a process compiles once per
    bucket it meets. Not dynamic: torch 2.13's CPU template renames its block-size variables by
    string replacement in the generated mask code, which corrupts any other size variable whose
    name they prefix ("ks2" inside "ks24"), and the mask reads per-row tensors.
    """
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def block_mask(paged: PagedBlocks, queries: int) -> BlockMask:
    """The group's ``BlockMask`` over the store's first ``width · block_size`` slots."""
    logical, positions, bs, window = paged.logical, paged.positions, paged.block_size, paged.sliding_window

    def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        block = logical[b, kv_idx // bs]
        t = block * bs + kv_idx % bs
        p = positions[b, q_idx]
        ok = (block >= 0) & (t <= p)
        return ok if window is None else ok & (p - t < window)

    return BlockMask.from_kv_blocks(
        paged.kv_num_blocks,
        paged.kv_indices,
        paged.full_kv_num_blocks,
        paged.full_kv_indices,
        BLOCK_SIZE=(paged.q_block, bs),
        mask_mod=visible,
        seq_lengths=(queries, paged.width * bs),
        compute_q_blocks=False,
    )


def flex_group_attention(
    q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, group: AttentionGroup, scale: float
) -> torch.Tensor:
    """Same contract as ``model.group_attention``: q [C, N, Hq, D], the layer's paged store
    [C, Hkv, slots, D] → [C, valid queries, Hq·D], without copying the store."""
    paged = group.paged
    if paged is None:
        raise ValueError("this attention group has no block lists; plan it with attention='flex' and block tables")
    c, _, hq, d = q.shape
    hkv = k_store.shape[1]
    b, s = paged.query_index.shape
    span = paged.width * paged.block_size
    keys = k_store.reshape(1, c * hkv, -1, d)
    values = v_store.reshape(1, c * hkv, -1, d)
    if keys.shape[2] != span:
        keys, values = keys[:, :, :span], values[:, :, :span]
    queries = q[:, paged.query_index].permute(1, 0, 3, 2, 4).reshape(b, c * hq, s, d)
    # the limit is the default's (8) in every other compiled region of the process; hitting it
    # raises rather than fall back to eager flex_attention, which materialises scores over the store
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        out = compiled_flex_attention()(
            queries, keys, values, block_mask=block_mask(paged, s), scale=scale, enable_gqa=hq != hkv
        )
    out = out.view(b, c, hq, s, d).permute(1, 0, 3, 2, 4).reshape(c, b, s, hq * d)
    return out[:, paged.query_valid]
