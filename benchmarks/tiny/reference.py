"""A plain, slow, obviously-correct antidistillation sampler with HF transformers.

Teacher plus two HF proxies loaded with θ+εg and θ−εg; every step recomputes everything from the
full token list (no cache), then greedy-picks argmax(z_T + λ·Δ). It shares no code with the
served path beyond ``perturbed_copies`` (θ ± εg in fp32), so token parity with vLLM means the
served processor computes the paper's function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from antidistill.benchmarks.tiny.models import load_hf
from antidistill.proxy_worker.core.weights import perturbed_copies


class ReferenceSampler:
    def __init__(
        self,
        teacher: Path,
        proxy: Path,
        theta: Mapping[str, torch.Tensor],
        grad: Mapping[str, torch.Tensor],
        epsilon: float,
    ) -> None:
        self.teacher = load_hf(teacher)
        self.epsilon = epsilon
        self.proxies = []
        for weights in perturbed_copies(theta, grad, (epsilon, -epsilon)):
            model = load_hf(proxy)
            model.load_state_dict(weights, strict=False)
            self.proxies.append(model)

    @torch.no_grad()
    def delta(self, ids: Sequence[int]) -> torch.Tensor:
        x = torch.tensor([list(ids)])
        plus, minus = (torch.log_softmax(m(x).logits[0, -1].float(), -1) for m in self.proxies)
        return (plus - minus) / (2 * self.epsilon)

    def generate(self, prompt: Sequence[int], lam: float, max_tokens: int) -> list[int]:
        return self.greedy(prompt, lam, max_tokens)[0]

    @torch.no_grad()
    def greedy(self, prompt: Sequence[int], lam: float, max_tokens: int) -> tuple[list[int], list[float]]:
        """Greedy tokens of argmax(z_T + λ·Δ) and, per step, the gap between its top two logits
        (where a near-tie lets rounding noise pick the other token: see ``first_divergence``)."""
        ids, margins = list(prompt), []
        for _ in range(max_tokens):
            z = self.teacher(torch.tensor([ids])).logits[0, -1].float()
            if lam > 0:
                d = self.delta(ids)
                z[: d.shape[0]] += lam * d
            top = torch.topk(z, 2).values
            margins.append(float(top[0] - top[1]))
            ids.append(int(torch.argmax(z)))
        return ids[len(prompt) :], margins


LOGPROB_NOISE = 1e-2
"""How far a chosen token's logprob may move between two correct runs of one request (batch shape,
preemption's recompute, another device's kernels). Measured on the CPU: ≤ 2.1e-3 on protected tiers
(λ/2ε amplifies the proxy's fp32 rounding up to 1500× at ε = 1e-3), exactly 0 at λ = 0; a proxy
resumed on the wrong context moved it by 0.38-0.49."""


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> int | None:
    """Where ``other`` first leaves the reference's greedy path, or None."""
    return next((k for k, (a, b) in enumerate(zip(reference, other, strict=True)) if a != b), None)


def agrees_up_to_noise(reference: Sequence[int], margins: Sequence[float], other: Sequence[int]) -> bool:
    """Token parity, except that the paths may part at a near-tie (top-2 margin < 2 × the noise):
    there rounding legitimately picks either token, and nothing after it is comparable."""
    step = first_divergence(reference, other)
    return step is None or margins[step] < 2 * LOGPROB_NOISE
