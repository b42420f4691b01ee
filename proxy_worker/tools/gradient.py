"""Offline tool: holdout teacher traces → g = ∇_θ ℓ(θ_P), written as safetensors.

    python -m antidistill.proxy_worker.tools.gradient --proxy DIR --traces holdout.jsonl --out grad.safetensors

ℓ is the proxy's completion-only NLL (prompt tokens masked). Traces are weighted EQUALLY, as in the
official code: ℓ = mean over traces of (mean NLL over that trace's completion tokens), so a long
trace does not outweigh a short one. Accumulation is in fp32; memory is bounded by
``--batch-tokens`` (traces are packed into passes of at most that many tokens).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from antidistill.proxy_worker.core.config import ProxyConfig, load_config
from antidistill.proxy_worker.core.gradient_file import CONFIG_HASH_KEY, save_gradient
from antidistill.proxy_worker.core.model import transformer_forward
from antidistill.proxy_worker.core.plan import build_plan
from antidistill.proxy_worker.core.rope import RotaryTable
from antidistill.proxy_worker.core.weights import load_proxy_state, stack_copies
from antidistill.proxy_worker.tools.traces import TokenizedTrace, read_traces, tokenize_trace
from tqdm import tqdm

log = logging.getLogger(__name__)
WEIGHTING = "mean over traces of each trace's mean completion-token NLL"


def trace_losses(
    params: Mapping[str, torch.Tensor], cfg: ProxyConfig, rope: RotaryTable, traces: Sequence[TokenizedTrace]
) -> torch.Tensor:
    """Per-trace mean completion NLL [B] under one-copy ``params`` (differentiable)."""
    plan = build_plan([t.ids for t in traces], [0] * len(traces))
    select, targets, owner = [], [], []
    offset = 0
    for b, t in enumerate(traces):
        for j in range(max(t.prompt_len, 1), len(t.ids)):
            select.append(offset + j - 1)
            targets.append(t.ids[j])
            owner.append(b)
        offset += len(t.ids)
    logits = transformer_forward(params, cfg, rope, plan, output=torch.tensor(select))[0]
    nll = F.cross_entropy(logits.float(), torch.tensor(targets), reduction="none")
    owner_t = torch.tensor(owner)
    counts = torch.bincount(owner_t, minlength=len(traces)).clamp(min=1)
    return torch.zeros(len(traces)).index_add(0, owner_t, nll) / counts


def batches(traces: Sequence[TokenizedTrace], max_tokens: int) -> Iterator[list[TokenizedTrace]]:
    """Greedy packing into passes of ≤ max_tokens (a longer trace runs alone)."""
    batch: list[TokenizedTrace] = []
    size = 0
    for t in traces:
        if batch and size + len(t.ids) > max_tokens:
            yield batch
            batch, size = [], 0
        batch.append(t)
        size += len(t.ids)
    if batch:
        yield batch


def compute_gradient(
    cfg: ProxyConfig,
    theta: Mapping[str, torch.Tensor],
    traces: Sequence[TokenizedTrace],
    batch_tokens: int = 2048,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], float]:
    """(g with the same names as ``theta``, mean loss ℓ) in fp32."""
    leaves = {k: v.detach().to(torch.float32).clone().requires_grad_(True) for k, v in theta.items()}
    rope = RotaryTable(cfg)
    total = 0.0
    bar = tqdm(total=len(traces), unit="trace", disable=not progress, desc="gradient")
    for batch in batches(traces, batch_tokens):
        params = stack_copies([leaves], cfg, torch.float32)
        losses = trace_losses(params, cfg, rope, batch)
        (losses.sum() / len(traces)).backward()
        total += float(losses.detach().sum())
        bar.update(len(batch))
    bar.close()
    grad = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}
    return {k: g.detach() for k, g in grad.items()}, total / len(traces)


def tokenize_all(tokenizer: object, records: Sequence[dict], max_tokens: int) -> list[TokenizedTrace]:
    """Tokenize, truncate to ``max_tokens``, and drop traces with no completion tokens left."""
    out = []
    for rec in records:
        t = tokenize_trace(tokenizer, rec)
        t = TokenizedTrace(t.ids[:max_tokens], t.prompt_len)
        if t.completion_tokens > 0:
            out.append(t)
    if len(out) < len(records):
        log.warning("skipped %d traces with no completion tokens", len(records) - len(out))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m antidistill.proxy_worker.tools.gradient", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--proxy", required=True, help="proxy model directory (config.json + safetensors)")
    ap.add_argument("--traces", required=True, help="holdout traces JSONL")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the proxy directory)")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="tokens per forward/backward pass")
    ap.add_argument("--max-trace-tokens", type=int, default=4096, help="truncate longer traces")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from transformers import AutoTokenizer

    start = time.time()
    cfg = load_config(args.proxy)
    theta = load_proxy_state(args.proxy, cfg)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.proxy)
    traces = tokenize_all(tokenizer, read_traces(args.traces), args.max_trace_tokens)
    grad, loss = compute_gradient(cfg, theta, traces, args.batch_tokens, progress=sys.stderr.isatty())
    meta = {
        CONFIG_HASH_KEY: cfg.digest,
        "num_traces": len(traces),
        "num_tokens": sum(t.completion_tokens for t in traces),
        "mean_loss": f"{loss:.6f}",
        "dtype": "float32",
        "weighting": WEIGHTING,
        "traces": Path(args.traces).name,
    }
    save_gradient(args.out, grad, meta)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grad.values()))
    log.info(
        "wrote %s: %d traces, %d completion tokens, mean loss %.4f, |g| %.4g, %.0f s",
        args.out,
        meta["num_traces"],
        meta["num_tokens"],
        loss,
        float(norm),
        time.time() - start,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
