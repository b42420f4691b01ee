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

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], lam: float, max_tokens: int) -> list[int]:
        ids = list(prompt)
        for _ in range(max_tokens):
            z = self.teacher(torch.tensor([ids])).logits[0, -1].float()
            if lam > 0:
                d = self.delta(ids)
                z[: d.shape[0]] += lam * d
            ids.append(int(torch.argmax(z)))
        return ids[len(prompt) :]
