"""Δ, the antidistillation direction, and the small pure functions that apply it.

    Δ(·) = [log p(· | x; θ + εg) − log p(· | x; θ − εg)] / (2ε)       (finite differences)
    Δ(·) = d/dε log p(· | x; θ + εg) at ε = 0                           (exact, forward-mode AD)

λ·Δ is added to the teacher's raw logits, before temperature; see docs/architecture.md ("One decode step").
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from antidistill.proxy_worker.core.config import ProxyConfig
from antidistill.proxy_worker.core.model import Output, transformer_forward
from antidistill.proxy_worker.core.plan import StepPlan
from antidistill.proxy_worker.core.rope import RotaryTable
from torch.func import jvp


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision inputs; fp64 stays fp64 (ground-truth runs)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def finite_difference(logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Δ from the two copies' logits [2, B, V] (copy 0 = θ+εg, copy 1 = θ−εg), in fp32 or wider."""
    logp = torch.log_softmax(at_least_fp32(logits), dim=-1)
    return (logp[0] - logp[1]) / (2.0 * epsilon)


def exact_delta(
    theta: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor],
    cfg: ProxyConfig,
    rope: RotaryTable,
    plan: StepPlan,
    output: Output = "last",
) -> torch.Tensor:
    """Directional derivative of the next-token log-probs along ``direction`` (fused, one copy).

    Runs a full forward (``plan`` without a KV cache) under ``torch.func.jvp``: no ε, no
    round-off from differencing; the ground truth for calibrating ε.
    """
    names = list(theta)

    def logprobs(*tensors: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, tensors, strict=True))
        return torch.log_softmax(at_least_fp32(transformer_forward(params, cfg, rope, plan, output=output)), dim=-1)

    primals = tuple(theta[k] for k in names)
    tangents = tuple(direction[k].to(theta[k].dtype) for k in names)
    _, tangent_out = jvp(logprobs, primals, tangents)
    return tangent_out[0]


def delta_scale(delta: torch.Tensor) -> float:
    """The Δ scale (core/strength.py): mean over positions (rows of ``delta`` [N, V]) of Δ's standard
    deviation across the vocabulary."""
    return float(delta.double().std(dim=-1).mean())


def non_finite_rows(delta: torch.Tensor) -> torch.Tensor:
    """Bool [B]: rows with any NaN/inf. Such rows must fall back to Δ = 0, never reach the sampler."""
    return ~torch.isfinite(delta).all(dim=-1)


def zero_non_finite_(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: zero Δ's bad rows; returns (Δ, bool mask of those rows). No host sync: nothing
    branches on the mask, so on a GPU the host does not wait for Δ here (the caller reads the mask
    once, to report the rows)."""
    bad = non_finite_rows(delta)
    return delta.masked_fill_(bad[:, None], 0.0), bad


def pad_to_width(delta: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad Δ [B, V_proxy] to the teacher's (padded) logits width."""
    extra = width - delta.shape[-1]
    if extra < 0:
        raise ValueError(f"proxy vocabulary ({delta.shape[-1]}) is wider than the teacher's logits ({width})")
    return torch.nn.functional.pad(delta, (0, extra)) if extra else delta


def add_scaled(logits: torch.Tensor, rows: torch.Tensor, lambdas: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """In place: ``logits[rows] += λ_row · Δ_row``; Δ may be narrower than the logits (padded with 0)."""
    width = delta.shape[-1]
    logits[rows, :width] += (lambdas[:, None] * delta).to(logits.dtype)
    return logits


class PermutationControl:
    """The paper's control (appendix A): Δ with a fixed random vocabulary permutation and a random
    sign per row. It keeps Δ's statistics but destroys the gradient's direction.

    The sign of a row is a hash of (seed, key), so it is reproducible for a given request position
    and independent of batch composition.
    """

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.seed = seed
        self.permutation = torch.randperm(vocab_size, generator=gen)

    def signs(self, keys: Sequence[int]) -> torch.Tensor:
        """±1 per key, from a keyed hash (stable across processes and machines)."""
        out = []
        for key in keys:
            digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=1).digest()
            out.append(1.0 if digest[0] & 1 else -1.0)
        return torch.tensor(out, dtype=torch.float32)

    def apply(self, delta: torch.Tensor, keys: Sequence[int]) -> torch.Tensor:
        perm = self.permutation.to(delta.device)
        return delta[:, perm] * self.signs(keys).to(delta.device)[:, None]
