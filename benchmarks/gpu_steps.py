"""The decode steps the GPU check times, in two forms: whole engine steps over rows that already hold
``context`` tokens of seeded random KV (what serving pays: plan, forward, Δ), and the bare forward
over a prebuilt plan (device work only, as a teacher's step or a captured CUDA graph runs it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from antidistill.benchmarks.gpu_models import EPSILON
from antidistill.proxy_worker.core import plan as planning
from antidistill.proxy_worker.core.delta import finite_difference
from antidistill.proxy_worker.core.model import StackedProxy
from antidistill.proxy_worker.runtime.cache import ProxyKVCache
from antidistill.proxy_worker.runtime.engine import ProxyEngine

BLOCK = 16


def fill_kv(engine: ProxyEngine, seed: int) -> None:
    """Seeded random keys/values in every slot, the copies ε apart: generated in fp32 layer by layer,
    so engines of any dtype built with the same seed hold the same (rounded) state."""
    store = engine.cache.store
    for layer in range(len(store.k)):
        for which, tensor in enumerate((store.k[layer], store.v[layer])):
            gen = torch.Generator(device=tensor.device).manual_seed(seed + 2 * layer + which)
            base = torch.randn(tensor.shape[1:], generator=gen, device=tensor.device)
            step = torch.randn(tensor.shape[1:], generator=gen, device=tensor.device)
            if tensor.shape[0] == 1:  # a layer both copies share (a restricted Δ mode)
                tensor[0].copy_(base)
            else:
                tensor[0].copy_(base + EPSILON * step)
                tensor[1].copy_(base - EPSILON * step)
            del base, step


@dataclass
class Rows:
    """An engine whose ``batch`` rows hold ``context`` computed tokens; ``step`` adds one token each."""

    engine: ProxyEngine
    outputs: list[list[int]]
    tokens: list[int]
    steps: int = 0

    def step(self) -> torch.Tensor:
        token = self.tokens[self.steps % len(self.tokens)]
        for out in self.outputs:
            out.append(token)
        self.steps += 1
        result = self.engine.step(range(len(self.outputs)))
        if result.failed:
            raise RuntimeError(f"gpu check: rows failed: {next(iter(result.failed.values())).message}")
        return result.delta


def build_rows(model: StackedProxy, path: str, batch: int, context: int, steps: int, seed: int) -> Rows:
    """Rows of seeded random prompts marked computed, with room for ``steps`` more tokens each."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    engine = ProxyEngine(model, EPSILON, batch * (context + steps + 2 * BLOCK), block_size=BLOCK, attention=path)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    for r in range(batch):
        engine.add(r, torch.randint(0, vocab, (context,), generator=gen).tolist(), outputs[r])
        row = engine.cache.rows[r]
        engine.cache.reserve(row, context)
        engine.cache.mark_written(row, row.computed, context)
        row.computed = context
    fill_kv(engine, seed)
    return Rows(engine, outputs, torch.randint(0, vocab, (steps + 1,), generator=gen).tolist())


def forward_fn(
    model: StackedProxy, batch: int, context: int, device: str, path: str = "reference"
) -> Callable[[], torch.Tensor]:
    """The forward of one decode step over a prebuilt plan (zero KV): device work only, no host
    planning, as a teacher's step or a captured graph runs it. Two copies return Δ, one the logits."""
    cache = ProxyKVCache(model.cfg, model.layer_copies, model.dtype, batch * (context + BLOCK), BLOCK, device)
    for r in range(batch):
        cache.add(r, [0] * (context + 1))
        cache.reserve(cache.rows[r], context + 1)
    slots = cache.slot_table([cache.rows[r] for r in range(batch)], context + 1)
    paged = cache.paged([cache.rows[r] for r in range(batch)]) if path != "reference" else slots
    plan = planning.build_plan([[1]] * batch, [context] * batch, paged, model.cfg.sliding_window, device, path)
    if model.copies == 2:
        return lambda: finite_difference(model.logits(plan, cache.store), EPSILON)
    return lambda: model.logits(plan, cache.store)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖, in fp32."""
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
