"""The index tensors one forward pass needs: which tokens are new, where their keys/values live,
and which earlier positions each query may attend to.

Rows of different lengths and different numbers of new tokens (a chunk of prefill, one decode
token) are packed into one flat token list; attention pads them to a [rows, queries, keys] grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPlan:
    """Everything position-dependent about one forward pass (all tensors on the model's device)."""

    tokens: torch.Tensor  # [N] new token ids, rows packed one after another
    positions: torch.Tensor  # [N] absolute position of each new token
    query_index: torch.Tensor  # [B, Smax] index into the N new tokens (padding repeats a valid one)
    query_valid: torch.Tensor  # [B, Smax] which grid cells are real queries
    kv_index: torch.Tensor  # [B, Tmax] where each row's keys/values live in the KV store
    mask: torch.Tensor  # [B, Smax, Tmax] True where the query may attend to the key
    write_index: torch.Tensor  # [N] KV-store slot each new token's key/value is written to
    last_index: torch.Tensor  # [B] index into N of each row's newest token

    @property
    def num_rows(self) -> int:
        return self.query_index.shape[0]


def build_plan(
    new_tokens: Sequence[Sequence[int]],
    starts: Sequence[int],
    kv_slots: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | str = "cpu",
) -> StepPlan:
    """Plan a pass over ``new_tokens[b]`` appended at position ``starts[b]`` of row ``b``.

    ``kv_slots[b, t]`` is the KV-store slot of row b's position t (a paged cache). Without it the
    KV store is the pass's own keys/values (index = flat token index), which requires every row
    to start at 0: a full forward with no cache, used for ground truth, gradients and JVPs.
    """
    counts = torch.tensor([len(t) for t in new_tokens], dtype=torch.long)
    if (counts < 1).any():
        raise ValueError("every row in a step needs at least one new token")
    start = torch.tensor(list(starts), dtype=torch.long)
    offsets = torch.cumsum(counts, 0) - counts
    smax = int(counts.max())
    s = torch.arange(smax)
    query_valid = s[None, :] < counts[:, None]
    clamped = torch.minimum(s[None, :], counts[:, None] - 1)
    qpos = start[:, None] + clamped
    query_index = offsets[:, None] + clamped
    lengths = start + counts
    tmax = int(lengths.max())
    t = torch.arange(tmax)
    if kv_slots is None:
        if bool((start != 0).any()):
            raise ValueError("a plan without a KV cache must start every row at position 0")
        kv_index = offsets[:, None] + torch.minimum(t[None, :], lengths[:, None] - 1)
    else:
        kv_index = kv_slots[:, :tmax].to("cpu", torch.long)
    mask = t[None, None, :] <= qpos[:, :, None]
    if sliding_window is not None:
        mask &= (qpos[:, :, None] - t[None, None, :]) < sliding_window
    write_index = kv_index.gather(1, qpos)[query_valid]
    tokens = torch.tensor([tok for row in new_tokens for tok in row], dtype=torch.long)
    return StepPlan(
        tokens=tokens.to(device),
        positions=qpos[query_valid].to(device),
        query_index=query_index.to(device),
        query_valid=query_valid.to(device),
        kv_index=kv_index.to(device),
        mask=mask.to(device),
        write_index=write_index.to(device),
        last_index=(offsets + counts - 1).to(device),
    )
