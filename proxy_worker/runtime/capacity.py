"""How many proxy KV tokens hold everything the teacher's scheduler can run — and the teacher cap
that makes a given proxy pool enough.

vLLM's scheduler admits work only while the teacher's KV blocks last and frees a request's blocks
when it finishes or is preempted; the proxy frees its rows on the same events (BatchUpdate), so
the teacher's capacity bounds the proxy's need, with two corrections:

- chunked prefill: the proxy computes a new row's whole prompt at its first step, the teacher only
  the chunk it scheduled; so the proxy may hold up to one prompt (``max_model_len`` tokens) more
  (vLLM's V1 scheduler runs the running requests first, so one prompt at a time is partly
  prefilled, unless ``--long-prefill-token-threshold`` caps each prompt's chunk);
- block rounding: both round a row up to whole blocks. When the proxy's block size divides the
  teacher's (16 divides vLLM's 16, 64, 128, 256), the proxy's rounding never costs more; otherwise
  each running row may cost one proxy block more.

Shared prefixes (vLLM's prefix cache) are matched by the proxy's own content-hashed blocks, which
are smaller than the teacher's, so the proxy shares at least what the teacher shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PROXY_BLOCK = 16


class CapacityError(ValueError):
    """The proxy pool and the teacher's KV capacity cannot be made to agree; start-up stops."""


def _round_up(tokens: int, block: int) -> int:
    return -(-tokens // block) * block


def headroom_tokens(max_model_len: int, teacher_block_size: int, max_num_seqs: int, partial_prefills: int = 1) -> int:
    """Proxy tokens needed beyond the teacher's capacity (see the module docstring)."""
    rounding = 0 if teacher_block_size % PROXY_BLOCK == 0 else max_num_seqs * PROXY_BLOCK
    return partial_prefills * _round_up(max_model_len, PROXY_BLOCK) + rounding


def partial_prefills(max_num_batched_tokens: int, long_prefill_token_threshold: int) -> int:
    """Prompts that can be partly prefilled at once: one, unless vLLM caps each prompt's chunk."""
    if long_prefill_token_threshold <= 0:
        return 1
    return -(-max_num_batched_tokens // long_prefill_token_threshold) + 1


@dataclass(frozen=True)
class Capacity:
    """The agreed sizes: ``teacher_blocks`` (None: not coupled, vLLM sizes its KV from memory)."""

    proxy_tokens: int
    teacher_blocks: int | None
    teacher_block_size: int
    headroom: int

    @property
    def teacher_tokens(self) -> int | None:
        return None if self.teacher_blocks is None else self.teacher_blocks * self.teacher_block_size

    @property
    def coupled(self) -> bool:
        return self.teacher_blocks is not None and self.teacher_tokens + self.headroom <= self.proxy_tokens


def teacher_cap(proxy_tokens: int, teacher_block_size: int, headroom: int) -> int:
    """The most teacher KV blocks a proxy pool of ``proxy_tokens`` can follow (``--num-gpu-blocks-override``)."""
    blocks = (proxy_tokens - headroom) // teacher_block_size
    if blocks < 1:
        raise CapacityError(
            f"a proxy KV pool of {proxy_tokens} tokens cannot follow even one teacher block of "
            f"{teacher_block_size} tokens plus {headroom} tokens of headroom (one --max-model-len prompt "
            f"being prefilled); raise --proxy-token-budget or lower --max-model-len"
        )
    return blocks


def plan(
    proxy_tokens: int | None,
    teacher_blocks: int | None,
    teacher_block_size: int,
    headroom: int,
    default_proxy_tokens: int,
    teacher_memory_blocks: int | None = None,
) -> Capacity:
    """Agree on both sizes from whichever the operator left free.

    - both given: they must agree (the pool holds the teacher's blocks plus headroom);
    - only the teacher's: the pool is sized from it;
    - only the pool (or neither: ``default_proxy_tokens``): the teacher is capped to it, and to what
      its KV memory holds when that is known (a cap above it would make vLLM allocate past it).
    """
    if teacher_blocks is not None:
        need = teacher_blocks * teacher_block_size + headroom
        if proxy_tokens is not None and proxy_tokens < need:
            raise CapacityError(
                f"--proxy-token-budget {proxy_tokens} cannot hold what --num-gpu-blocks-override {teacher_blocks} "
                f"lets the teacher schedule ({teacher_blocks} × {teacher_block_size} tokens + {headroom} headroom "
                f"= {need}); raise the budget to {need}, or drop one of the two flags"
            )
        return Capacity(proxy_tokens or need, teacher_blocks, teacher_block_size, headroom)
    pool = proxy_tokens if proxy_tokens is not None else default_proxy_tokens
    blocks = teacher_cap(pool, teacher_block_size, headroom)
    if teacher_memory_blocks is not None:
        blocks = min(blocks, teacher_memory_blocks)
    return Capacity(pool, blocks, teacher_block_size, headroom)


def from_vllm_config(vllm_config: Any, token_budget: int) -> Capacity:
    """The worker's view, from the engine's final config: the pool must hold what vLLM was capped to.

    ``antidistill serve`` always sets the cap; a plain ``vllm serve`` without
    ``--num-gpu-blocks-override`` leaves the capacity uncoupled (logged; protected rows that do not
    fit are refused, never served unprotected).
    """
    cache, sched = vllm_config.cache_config, vllm_config.scheduler_config
    partial = partial_prefills(sched.max_num_batched_tokens, sched.long_prefill_token_threshold)
    headroom = headroom_tokens(vllm_config.model_config.max_model_len, cache.block_size, sched.max_num_seqs, partial)
    blocks = cache.num_gpu_blocks_override
    if blocks is None:
        return Capacity(token_budget, None, cache.block_size, headroom)
    return Capacity(max(token_budget, blocks * cache.block_size + headroom), blocks, cache.block_size, headroom)


def describe(capacity: Capacity, proxy_bytes_per_token: Sequence[int], teacher_bytes_per_token: int | None) -> str:
    """One line for the start-up log of a coupled plan (``plan``'s): both capacities and what each costs.
    ``proxy_bytes_per_token``: one entry per profile (a restricted Δ mode holds its shared layers once)."""
    gib = 2**30
    proxy = (
        f"proxy {capacity.proxy_tokens:,} tokens per profile × {len(proxy_bytes_per_token)} "
        f"({capacity.proxy_tokens * sum(proxy_bytes_per_token) / gib:.2f} GiB)"
    )
    cost = ""
    if teacher_bytes_per_token is not None:
        cost = f", {capacity.teacher_tokens * teacher_bytes_per_token / gib:.2f} GiB"
    return (
        f"KV capacity: teacher {capacity.teacher_tokens:,} tokens ({capacity.teacher_blocks} blocks × "
        f"{capacity.teacher_block_size}{cost}); {proxy}; headroom {capacity.headroom:,} tokens for a prompt "
        f"being prefilled in chunks"
    )
