"""The protection dose of a trace: how fast training on it raises the proxy's held-out loss.

A student trained on trace x moves its parameters along ∇θ log p(x). To first order the held-out
loss L then changes at the rate ⟨∇L, ∇θ log p(x)⟩ = ⟨g, ∇θ log p(x)⟩ = Σ_t Δ(x_t | x_<t), since g is
∇L and Δ is the directional derivative of the log-probs along g. The dose is that sum's mean over
the completion's tokens, divided by the gradient's Δ scale s (core/strength.py), so it reads in
strength units: it is what antidistillation sampling raises, and a trace costs one teacher-forced
forward-mode pass of the proxy (exact Δ, no ε). Positive: training on it hurts the distiller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from antidistill.proxy_worker.core.config import ProxyConfig, load_config
from antidistill.proxy_worker.core.delta import exact_delta
from antidistill.proxy_worker.core.gradient_file import load_gradient
from antidistill.proxy_worker.core.plan import build_plan
from antidistill.proxy_worker.core.rope import RotaryTable
from antidistill.proxy_worker.core.weights import load_proxy_state, padded_direction, stack_copies
from antidistill.proxy_worker.tools.traces import TokenizedTrace


def completion_delta(delta: torch.Tensor, ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
    """Δ of each next token actually written: ``delta`` [N, V] at ``positions``, gathered at ids[p + 1]."""
    nxt = torch.tensor([ids[p + 1] for p in positions])
    return delta.gather(1, nxt[:, None])[:, 0]


class DoseMeter:
    """The dose of traces under one gradient profile (θ, g and s of one ``--gradient``)."""

    def __init__(
        self,
        cfg: ProxyConfig,
        theta: Mapping[str, torch.Tensor],
        grad: Mapping[str, torch.Tensor],
        scale: float,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cfg, self.scale = cfg, scale
        theta, direction = padded_direction(theta, grad, cfg)  # any Δ mode's g
        self.params = stack_copies([theta], cfg, dtype)
        self.direction = stack_copies([direction], cfg, dtype)
        self.rope = RotaryTable(cfg)

    @classmethod
    def from_files(cls, proxy: str | Path, gradient: str | Path, scale: float) -> DoseMeter:
        cfg = load_config(proxy)
        return cls(cfg, load_proxy_state(proxy, cfg), load_gradient(gradient, cfg), scale)

    @torch.no_grad()
    def dose(self, trace: TokenizedTrace) -> float | None:
        """Mean Δ(x_t | x_<t) / s over the completion's tokens (None: it has none)."""
        positions = list(range(max(trace.prompt_len, 1) - 1, len(trace.ids) - 1))
        if not positions or trace.completion_tokens <= 0:
            return None
        plan = build_plan([trace.ids], [0])
        delta = exact_delta(self.params, self.direction, self.cfg, self.rope, plan, output=torch.tensor(positions))
        return float(completion_delta(delta, trace.ids, positions).double().mean()) / self.scale

    def mean_dose(self, traces: Sequence[TokenizedTrace]) -> float | None:
        """The mean dose of the traces that have a completion (None: none has)."""
        doses = [d for d in map(self.dose, traces) if d is not None]
        return sum(doses) / len(doses) if doses else None
