"""The benchmark workload: gsm_symbolic problems as chat prompts, and a cached proxy gradient.

Shared by every benchmark so their numbers describe the same traffic.
"""

from __future__ import annotations

from pathlib import Path

from antidistill.server.embedded_model import DEFAULT_CACHE


def questions(count: int, seed: int = 2) -> list[str]:
    import reasoning_gym

    return [x["question"] for x in reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed)]


def prompt_token_ids(teacher: Path, count: int) -> list[list[int]]:
    """Chat-templated prompt ids (what /v1/chat/completions would feed the teacher)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    out = []
    for q in questions(count):
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def benchmark_gradient(proxy: Path, traces: int = 16) -> Path:
    """A cached gradient for the proxy from gsm_symbolic worked solutions."""
    import reasoning_gym
    from antidistill.proxy_worker.tools.gradient import build_gradient_file

    out = DEFAULT_CACHE / f"{proxy.name}-bench-grad.safetensors"
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
    return build_gradient_file(proxy, records, out).path
