"""Accuracy of a model on held-out problems: greedy completions from HF, checked exactly."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from antidistill.benchmarks.distillation.tasks import Problem, prompt_of
from antidistill.proxy_worker.core.answers import is_correct
from transformers import PreTrainedTokenizerBase


def greedy_completions(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy continuations (stop at EOS)."""
    return _complete(model, tokenizer, prompts, max_new_tokens, {"do_sample": False})


def sampled_completions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> list[str]:
    """Plain (λ = 0) sampling; temperature 0 means greedy, as in vLLM."""
    if temperature == 0:
        return greedy_completions(model, tokenizer, prompts, max_new_tokens)
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return _complete(model, tokenizer, prompts, max_new_tokens, options)


@torch.inference_mode()
def _complete(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    options: dict,
    batch_size: int = 64,
) -> list[str]:
    """Left-padded batches of prompts tokenized as in training, decoded without special tokens."""
    model.eval()
    pad = tokenizer.pad_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        encoded = [tokenizer(p)["input_ids"] for p in prompts[i : i + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        gen = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            **options,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        out.extend(tokenizer.decode(row[width:], skip_special_tokens=True) for row in gen)
    return out


def correctness(completions: Sequence[str], problems: Sequence[Problem]) -> list[int]:
    """1 or 0 per problem: kept in the registry so that intervals can resample the test problems."""
    if not problems:
        raise ValueError("no problems to score")
    return [int(is_correct(c, p["answer"])) for c, p in zip(completions, problems, strict=True)]


def accuracy(completions: Sequence[str], problems: Sequence[Problem]) -> float:
    scored = correctness(completions, problems)
    return sum(scored) / len(scored)


def model_correctness(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], max_new_tokens: int
) -> list[int]:
    """``correctness`` of the model's greedy completions."""
    prompts = [prompt_of(p) for p in problems]
    return correctness(greedy_completions(model, tokenizer, prompts, max_new_tokens), problems)


def model_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem], max_new_tokens: int
) -> float:
    scored = model_correctness(model, tokenizer, problems, max_new_tokens)
    return sum(scored) / len(scored)
