"""The benchmark workload: gsm_symbolic problems as chat prompts, and a cached proxy gradient.

Shared by every benchmark so their numbers describe the same traffic.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from antidistill.proxy_worker.core.delta_mode import FULL, DeltaMode
from antidistill.server.embedded.model import DEFAULT_CACHE

MIXED_BUDGETS = (16, 160)
"""Output budgets of the mixed workload: log-uniform between these (tokens)."""


def questions(count: int, seed: int = 2) -> list[str]:
    import reasoning_gym

    return [x["question"] for x in reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed)]


def mixed_requests(count: int, seed: int = 3) -> tuple[list[str], list[int]]:
    """A stream like users send: prompts with zero to three worked examples before the question
    (≈ 70–700 tokens), each with its own output budget (log-uniform over ``MIXED_BUDGETS``); sent
    without ignore_eos, most answers end at EOS before their budget."""
    import reasoning_gym

    data = list(reasoning_gym.create_dataset("gsm_symbolic", size=count + 3, seed=seed))
    shots = [f"{x['question']}\n{x['metadata']['answer_cot']}" for x in data[count:]]
    rng = random.Random(seed)
    low, high = (math.log(b) for b in MIXED_BUDGETS)
    prompts, budgets = [], []
    for x in data[:count]:
        prompts.append("\n\n".join([*shots[: rng.choice((0, 0, 1, 2, 3))], x["question"]]))
        budgets.append(round(math.exp(rng.uniform(low, high))))
    return prompts, budgets


def prompt_token_ids(teacher: Path, count: int) -> list[list[int]]:
    """Chat-templated prompt ids of the first ``count`` benchmark questions."""
    return chat_token_ids(teacher, questions(count))


def chat_token_ids(teacher: Path, texts: list[str]) -> list[list[int]]:
    """Chat-templated prompt ids (what /v1/chat/completions would feed the teacher)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    out = []
    for q in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def benchmark_gradient(proxy: Path, traces: int = 16, mode: DeltaMode = FULL) -> Path:
    """A cached gradient for the proxy from gsm_symbolic worked solutions (restricted to ``mode``)."""
    import reasoning_gym
    from antidistill.proxy_worker.tools.gradient import build_gradient_file

    tag = "" if mode == FULL else "-" + str(mode).replace(":", "")
    out = DEFAULT_CACHE / f"{proxy.name}-bench-grad{tag}.safetensors"
    if out.is_file():
        return out
    data = reasoning_gym.create_dataset("gsm_symbolic", size=traces, seed=1)
    records = [
        {
            "messages": [
                {"role": "user", "content": x["question"]},
                {"role": "assistant", "content": x["metadata"]["answer_cot"]},
            ]
        }
        for x in data
    ]
    return build_gradient_file(proxy, records, out, mode=mode).path
