"""The start-up half of capacity coupling: from vLLM's parsed flags and the two model configs, agree
on the teacher's KV cap (``--num-gpu-blocks-override``) and each profile's proxy KV pool.

The maths is in ``antidistill.proxy_worker.runtime.capacity``; this module only reads what it needs (block size, max
model length, KV bytes per token, the CPU KV space) and says what it decided. The worker checks
the plan again against the engine's final config and grows its pool if the teacher's block size
came out larger than planned, so the proxy always holds what the teacher can schedule.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from antidistill.proxy_worker.core.config import ProxyConfig
from antidistill.proxy_worker.core.delta_mode import DeltaMode
from antidistill.proxy_worker.runtime import capacity
from antidistill.server.startup.cpu_platform import on_cpu

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}


def _platform_block_size() -> int:
    """vLLM's default KV block size on this platform (CPU attention: 128; CUDA backends: 16)."""
    return 128 if on_cpu() else 16


def _teacher_config(model: str) -> dict[str, Any] | None:
    path = Path(model).expanduser() / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    return cfg.get("text_config", cfg)


def teacher_kv_bytes_per_token(cfg: dict[str, Any], dtype: str) -> int:
    """Keys and values of every layer for one token (the usual attention layout)."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES.get(dtype, 2)


def proxy_kv_bytes_per_token(cfg: ProxyConfig, dtype: str, mode: DeltaMode) -> int:
    """Keys and values of every layer's copies: both perturbed copies, or one in a layer ``mode`` shares."""
    return 2 * sum(mode.layer_copies(cfg.num_layers)) * cfg.num_kv_heads * cfg.head_dim * DTYPE_BYTES[dtype]


def max_model_len(args: argparse.Namespace, teacher: dict[str, Any] | None) -> int:
    value = args.max_model_len
    if isinstance(value, int) and value > 0:
        return value
    if teacher is not None and teacher.get("max_position_embeddings"):
        return int(teacher["max_position_embeddings"])
    raise capacity.CapacityError(
        "pass --max-model-len: the proxy's KV pool is planned from it (the teacher's config does not say)"
    )


def plan_capacity(args: argparse.Namespace, proxy_tokens: int | None, default_proxy_tokens: int) -> capacity.Capacity:
    """The agreed capacities for vLLM's parsed ``args`` (``proxy_tokens``: the operator's budget, if given)."""
    teacher = _teacher_config(args.model)
    block = args.block_size or _platform_block_size()
    length = max_model_len(args, teacher)
    headroom = capacity.headroom_tokens(
        length,
        block,
        args.max_num_seqs or 256,
        capacity.partial_prefills(args.max_num_batched_tokens or 0, args.long_prefill_token_threshold or 0),
    )
    memory_blocks = None
    space = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if teacher is not None and space and on_cpu():  # the CPU KV space is known before start; GPU memory is not
        per_block = teacher_kv_bytes_per_token(teacher, args.dtype) * block
        memory_blocks = max(1, int(float(space) * 2**30) // per_block)
    return capacity.plan(
        proxy_tokens, args.num_gpu_blocks_override, block, headroom, default_proxy_tokens, memory_blocks
    )


def describe_plan(
    plan: capacity.Capacity, args: argparse.Namespace, proxy: ProxyConfig, proxy_dtype: str, modes: Sequence[DeltaMode]
) -> str:
    """The plan's start-up line; ``modes``: each profile's Δ mode (what its proxy pool holds per token)."""
    teacher = _teacher_config(args.model)
    per_token = None if teacher is None else teacher_kv_bytes_per_token(teacher, args.dtype)
    return capacity.describe(plan, [proxy_kv_bytes_per_token(proxy, proxy_dtype, m) for m in modes], per_token)
