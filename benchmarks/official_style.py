"""An official-style antidistillation sampler, written from the paper's description: HF ``generate``
over a STATIC batch, with a logits processor that runs two cached HF proxies (θ+εg, θ−εg) one after
the other at every step. The baseline our served path is compared against (antidistill.benchmarks.overhead).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from antidistill.proxy_worker.core.weights import perturbed_copies
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList


class TwoProxyProcessor(LogitsProcessor):
    """scores += λ·Δ, Δ from two HF proxies with their own KV caches (left-padded static batch)."""

    def __init__(self, proxies: Sequence[torch.nn.Module], mask: torch.Tensor, lam: float, epsilon: float) -> None:
        self.proxies, self.mask, self.lam, self.epsilon = proxies, mask, lam, epsilon
        self.past: list = [None, None]
        self.seen = 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.seen:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(input_ids), 1)], dim=1)
        new = input_ids[:, self.seen :]
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, self.seen :]
        logps = []
        for i, proxy in enumerate(self.proxies):
            out = proxy(
                input_ids=new,
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.past[i],
                use_cache=True,
            )
            self.past[i] = out.past_key_values
            logps.append(torch.log_softmax(out.logits[:, -1].float(), dim=-1))
        self.seen = input_ids.shape[1]
        delta = (logps[0] - logps[1]) / (2 * self.epsilon)
        scores[:, : delta.shape[1]] += self.lam * delta
        return scores


def load_official_style(
    proxy: Path, theta: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor], epsilon: float
) -> list[torch.nn.Module]:
    models = []
    for weights in perturbed_copies(theta, grad, (epsilon, -epsilon)):
        model = AutoModelForCausalLM.from_pretrained(proxy, dtype=torch.float32).eval()
        model.load_state_dict(weights, strict=False)
        models.append(model)
    return models


@dataclass(frozen=True)
class OfficialStyle:
    """The teacher, its two proxies and the sampler's constants: static-batch greedy generation."""

    teacher: torch.nn.Module
    proxies: Sequence[torch.nn.Module]
    lam: float
    epsilon: float
    pad_id: int

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int | None = None
    ) -> torch.Tensor:
        """Greedy generation for every prompt in one static batch → the new tokens [B, ≤ max_new_tokens].
        Without ``eos_id`` every row runs ``max_new_tokens``; with it the batch runs until its last row
        stops (finished rows are padded, and still computed)."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        processor = TwoProxyProcessor(self.proxies, mask.clone(), self.lam, self.epsilon)
        out = self.teacher.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens if eos_id is None else 0,
            do_sample=False,
            logits_processor=LogitsProcessorList([processor]),
            pad_token_id=self.pad_id,
            eos_token_id=eos_id,
        )
        return out[:, width:]

    def tokens_per_second(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> float:
        """Greedy generation of ``max_new_tokens`` for every prompt in one static batch."""
        start = time.perf_counter()
        new = self.generate(prompts, max_new_tokens)
        return new.numel() / (time.perf_counter() - start)

    def mixed_tokens_per_second(
        self, prompts: Sequence[Sequence[int]], budgets: Sequence[int], batch: int, eos_id: int
    ) -> float:
        """The mixed workload as a static-batch server runs it: requests in arrival order, ``batch``
        at a time, each batch generating until its longest row stops (EOS or its largest budget)."""
        tokens, start = 0, time.perf_counter()
        for i in range(0, len(prompts), batch):
            chunk = budgets[i : i + batch]
            tokens += useful_tokens(self.generate(prompts[i : i + batch], max(chunk), eos_id), chunk, eos_id)
        return tokens / (time.perf_counter() - start)


def useful_tokens(new: torch.Tensor, budgets: Sequence[int], eos_id: int) -> int:
    """Tokens each row really asked for: up to its own budget and through its first EOS (as a
    server counts completion tokens); what a static batch computes past that is waste."""
    total = 0
    for row, budget in zip(new.tolist(), budgets, strict=True):
        row = row[:budget]
        total += row.index(eos_id) + 1 if eos_id in row else len(row)
    return total
