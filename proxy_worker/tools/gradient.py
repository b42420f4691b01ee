"""Offline tool: holdout teacher traces → g = ∇_θ ℓ(θ_P), written as safetensors.

    antidistill gradient --proxy DIR --traces holdout.jsonl --out grad.safetensors
    antidistill gradient --proxy DIR --traces holdout.jsonl --out grad.safetensors --add-scale   # an older g
    antidistill gradient --proxy DIR --traces holdout.jsonl --out head.safetensors --mode head

ℓ is the proxy's completion-only NLL (prompt tokens masked). Traces are weighted EQUALLY, as in the
official code: ℓ = mean over traces of (mean NLL over that trace's completion tokens), so a long
trace does not outweigh a short one. Accumulation is in fp32; memory is bounded by
``--batch-tokens`` (traces are packed into passes of at most that many tokens).

``build_gradient_file`` is the one way a gradient file is made (this CLI, ``make serve``'s default
setup, the benchmarks and the tests all call it), so every g carries the same metadata — among it
the Δ scale s that turns a tier's ``strength`` into λ (core/strength.py). ``--add-scale`` measures
and stores s in a gradient file written before scales were stored, leaving g itself untouched.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from antidistill.proxy_worker.core.config import ProxyConfig, load_config
from antidistill.proxy_worker.core.delta import delta_scale, exact_delta
from antidistill.proxy_worker.core.delta_mode import FULL, DeltaMode
from antidistill.proxy_worker.core.gradient_file import (
    CONFIG_HASH_KEY,
    DELTA_MODE_KEY,
    DELTA_SCALE_KEY,
    load_gradient,
    read_metadata,
    save_gradient,
)
from antidistill.proxy_worker.core.model import transformer_forward
from antidistill.proxy_worker.core.plan import build_plan
from antidistill.proxy_worker.core.rope import RotaryTable
from antidistill.proxy_worker.core.weights import (
    gradient_shapes,
    load_proxy_state,
    padded_direction,
    stack_copies,
    with_untied_head,
)
from antidistill.proxy_worker.tools.traces import TokenizedTrace, read_traces, tokenize_trace
from tqdm import tqdm

log = logging.getLogger(__name__)
WEIGHTING = "mean over traces of each trace's mean completion-token NLL"
SCALE_TRACES = 8  # holdout traces the Δ scale is measured on …
SCALE_POSITIONS = 64  # … and completion positions per trace (evenly spaced)


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
    mode: DeltaMode = FULL,
) -> tuple[dict[str, torch.Tensor], float]:
    """(g, mean loss ℓ) in fp32: g has the names ``theta`` has for ``full``, else the ones ``mode``
    covers (``weights.gradient_shapes``), with a tied proxy's head as its own, untied parameter: the
    gradient of ℓ with respect to the head alone, not the tied tensor's two uses together."""
    if mode.restricted:
        theta = with_untied_head(theta, cfg)
    covered = set(gradient_shapes(cfg, mode))
    leaves = {k: v.detach().to(torch.float32).clone().requires_grad_(k in covered) for k, v in theta.items()}
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
    grad = {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items() if k in covered}
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


def completion_positions(trace: TokenizedTrace, count: int) -> list[int]:
    """Up to ``count`` evenly spaced positions whose next token is a completion token."""
    first, last = max(trace.prompt_len, 1) - 1, len(trace.ids) - 2
    n = last - first + 1
    if n <= count:
        return list(range(first, last + 1))
    return sorted({first + round(i * (n - 1) / (count - 1)) for i in range(count)})


@torch.no_grad()
def measure_delta_scale(
    cfg: ProxyConfig,
    theta: Mapping[str, torch.Tensor],
    grad: Mapping[str, torch.Tensor],
    traces: Sequence[TokenizedTrace],
    max_traces: int = SCALE_TRACES,
    positions: int = SCALE_POSITIONS,
    dtype: torch.dtype = torch.float32,
) -> float:
    """The Δ scale s of g (core/strength.py): exact Δ (forward-mode JVP, in ``dtype``) at completion
    positions of the first ``max_traces`` traces, one trace at a time to bound memory. A restricted
    mode's g is the full direction with zeros on the parameters it leaves alone."""
    theta, direction_full = padded_direction(theta, grad, cfg)
    params = stack_copies([theta], cfg, dtype)
    direction = stack_copies([direction_full], cfg, dtype)
    rope = RotaryTable(cfg)
    deltas = []
    for trace in traces[:max_traces]:
        select = torch.tensor(completion_positions(trace, positions))
        plan = build_plan([trace.ids], [0])
        deltas.append(exact_delta(params, direction, cfg, rope, plan, output=select))
    if not deltas:
        raise ValueError("no traces with completion tokens to measure the Δ scale on")
    return delta_scale(torch.cat(deltas))


@dataclass(frozen=True)
class BuiltGradient:
    """What ``build_gradient_file`` wrote, and what it computed it from (calibration reuses θ and
    the traces)."""

    path: Path
    grad: dict[str, torch.Tensor]
    theta: dict[str, torch.Tensor]
    traces: list[TokenizedTrace]
    mean_loss: float
    metadata: dict[str, object]

    @property
    def norm(self) -> float:
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in self.grad.values())))


def build_gradient_file(
    proxy_dir: str | Path,
    traces: str | Path | Sequence[dict[str, Any]],
    out: str | Path,
    *,
    tokenizer: Any = None,
    batch_tokens: int = 2048,
    max_trace_tokens: int = 4096,
    progress: bool = False,
    mode: DeltaMode = FULL,
) -> BuiltGradient:
    """The one way a gradient file is made: load θ, tokenize the traces (a JSONL file or its
    records), compute g (restricted to ``mode``), and save it with the proxy's config hash and the
    mode, so the server can tell whose g it is and which layers to run twice. ``tokenizer``: a
    tokenizer or a directory (default: the proxy directory)."""
    cfg = load_config(proxy_dir)
    theta = load_proxy_state(proxy_dir, cfg)
    if tokenizer is None or isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer or proxy_dir)
    records = read_traces(traces) if isinstance(traces, str | Path) else list(traces)
    tokenized = tokenize_all(tokenizer, records, max_trace_tokens)
    grad, loss = compute_gradient(cfg, theta, tokenized, batch_tokens, progress=progress, mode=mode)
    meta: dict[str, object] = {
        CONFIG_HASH_KEY: cfg.digest,
        DELTA_MODE_KEY: str(mode),
        "num_traces": len(tokenized),
        "num_tokens": sum(t.completion_tokens for t in tokenized),
        "mean_loss": f"{loss:.6f}",
        "dtype": "float32",
        "weighting": WEIGHTING,
        DELTA_SCALE_KEY: f"{measure_delta_scale(cfg, theta, grad, tokenized):.6g}",
    }
    if isinstance(traces, str | Path):
        meta["traces"] = Path(traces).name
    save_gradient(out, grad, meta)
    return BuiltGradient(Path(out), grad, theta, tokenized, loss, meta)


def add_delta_scale(
    proxy_dir: str | Path,
    traces: str | Path,
    path: str | Path,
    *,
    tokenizer: Any = None,
    max_trace_tokens: int = 4096,
) -> float:
    """Measure the Δ scale of an existing gradient file on ``traces`` and store it in the file's
    metadata (rewritten in place, atomically); g and the other metadata are kept as they are."""
    cfg = load_config(proxy_dir)
    theta = load_proxy_state(proxy_dir, cfg)
    grad = load_gradient(path, cfg)
    if tokenizer is None or isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer or proxy_dir)
    tokenized = tokenize_all(tokenizer, read_traces(traces), max_trace_tokens)
    scale = measure_delta_scale(cfg, theta, grad, tokenized)
    meta = {**read_metadata(path), DELTA_SCALE_KEY: f"{scale:.6g}"}
    tmp = Path(path).with_suffix(".partial")
    save_gradient(tmp, grad, meta)
    tmp.replace(path)
    return float(meta[DELTA_SCALE_KEY])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="antidistill gradient", description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxy", required=True, help="proxy model directory (config.json + safetensors)")
    ap.add_argument("--traces", required=True, help="holdout traces JSONL")
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the proxy directory)")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="tokens per forward/backward pass")
    ap.add_argument("--max-trace-tokens", type=int, default=4096, help="truncate longer traces")
    ap.add_argument(
        "--mode",
        type=DeltaMode.parse,
        default=FULL,
        help="Δ mode: full (every parameter, the default), head (the untied output head), or last:K "
        "(the last K blocks, the final norm and the head); see docs/serving.md",
    )
    ap.add_argument(
        "--add-scale",
        action="store_true",
        help="only measure the Δ scale of the existing --out gradient on --traces and store it in its metadata",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.add_scale:
        scale = add_delta_scale(
            args.proxy, args.traces, args.out, tokenizer=args.tokenizer, max_trace_tokens=args.max_trace_tokens
        )
        log.info("stored Δ scale %.4g in %s (strength b means λ = b / %.4g)", scale, args.out, scale)
        return 0

    start = time.time()
    built = build_gradient_file(
        args.proxy,
        args.traces,
        args.out,
        tokenizer=args.tokenizer,
        batch_tokens=args.batch_tokens,
        max_trace_tokens=args.max_trace_tokens,
        progress=sys.stderr.isatty(),
        mode=args.mode,
    )
    log.info(
        "wrote %s (Δ mode %s): %d traces, %d completion tokens, mean loss %.4f, |g| %.4g, Δ scale %s, %.0f s",
        built.path,
        built.metadata[DELTA_MODE_KEY],
        built.metadata["num_traces"],
        built.metadata["num_tokens"],
        built.mean_loss,
        built.norm,
        built.metadata[DELTA_SCALE_KEY],
        time.time() - start,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
