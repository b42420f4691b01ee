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
    from antidistill.proxy_worker.core.config import load_config
    from antidistill.proxy_worker.core.gradient_file import CONFIG_HASH_KEY, save_gradient
    from antidistill.proxy_worker.core.weights import load_proxy_state
    from antidistill.proxy_worker.tools.gradient import compute_gradient
    from antidistill.proxy_worker.tools.traces import tokenize_trace
    from transformers import AutoTokenizer

    out = DEFAULT_CACHE / f"{proxy.name}-bench-grad.safetensors"
    if out.is_file():
        return out
    tok = AutoTokenizer.from_pretrained(proxy)
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
    cfg = load_config(proxy)
    grad, loss = compute_gradient(cfg, load_proxy_state(proxy, cfg), [tokenize_trace(tok, r) for r in records])
    save_gradient(out, grad, {CONFIG_HASH_KEY: cfg.digest, "mean_loss": loss, "num_traces": traces})
    return out
