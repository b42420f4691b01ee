"""Proxy decode-step latency: one copy vs two copies in ONE batched pass vs two copies one after the
other, over batch × context, with the bytes, FLOPs and roofline each step implies.

    python -m antidistill.benchmarks.proxy_step --out benchmarks/results/proxy_step-cpu.json
    python -m antidistill.benchmarks.proxy_step --shape qwen2.5-0.5b --dtype bfloat16 --device cuda   # on a GPU
    python -m antidistill.benchmarks.proxy_step --shared-prefix 1000 --batches 32 --contexts 1024   # prefix sharing
    python -m antidistill.benchmarks.proxy_step --attention reference flex --out proxy_step-flex-cpu.json
    python -m antidistill.benchmarks.proxy_step --gemm matmul packed   # prepacked linears beside plain matmuls
    python -m antidistill.benchmarks.proxy_step --shape qwen2.5-1.5b --delta-modes head last:4   # Δ modes' cost

Every row already holds ``context`` cached tokens (random KV: values do not change the cost) and
each step adds one token per row: plan + forward + log-softmax (Δ for two copies). All modes run
side by side in one process, so the ratios are meaningful on a noisy machine. ``--attention``
names the attention paths of the two-copy batched pass (the first is the table's "batched";
each further one adds its own column, its ratio to the first, and its first-call time, which
for "flex" includes compiling a new shape bucket); ``--gemm`` does the same for the layout of the
linear weights (``matmul``: plain, the default; ``packed``: prepacked for oneDNN, CPU fp32), and
``--delta-modes`` for restricted Δ modes (core/delta_mode.py: the shared trunk runs once).

``--shared-prefix P`` instead runs whole engine steps (cache bookkeeping, plan, forward, Δ) over
rows of ``context`` prompt tokens, once with distinct prompts and once with the first P tokens
shared, and reports the proxy KV tokens held, the prompt tokens the first step would compute,
and the decode step time.

On CPU the process first takes on the allocator setting ``antidistill serve`` gives the engine
(``server/startup/cpu_platform.py``), so the step costs what it costs in the served worker.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from antidistill.benchmarks.report import write_json
from antidistill.benchmarks.timing import copy_bandwidth, first_call_seconds, median_seconds
from antidistill.proxy_worker.core.config import ProxyConfig, parse_config
from antidistill.proxy_worker.core.delta import finite_difference
from antidistill.proxy_worker.core.delta_mode import DeltaMode
from antidistill.proxy_worker.core.model import StackedProxy
from antidistill.proxy_worker.core.packed_linear import GEMM_PATHS
from antidistill.proxy_worker.core.plan import ATTENTION_PATHS, AttentionPath, build_plan
from antidistill.proxy_worker.core.weights import DTYPES
from antidistill.proxy_worker.runtime.cache import ProxyKVCache
from antidistill.proxy_worker.runtime.engine import ProxyEngine
from antidistill.server.startup.cpu_platform import TUNABLES_ENV, allocator_env, apply_engine_env

SHAPES = {
    "smollm2-135m": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
}


def random_params(cfg: ProxyConfig, copies: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Fused-layout random weights (cost does not depend on values)."""
    from antidistill.proxy_worker.core.weights import expected_shapes, stack_copies

    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in expected_shapes(cfg).items()}
    return {k: v.to(device) for k, v in stack_copies([state] * copies, cfg, dtype).items()}


def mode_params(cfg: ProxyConfig, mode: DeltaMode, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Random θ ± εg for a Δ mode, built as the server builds it: the layers the mode's g leaves alone
    are held once (``stack_perturbed``), so the pass runs them once."""
    from antidistill.proxy_worker.core.weights import expected_shapes, gradient_shapes, stack_perturbed

    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in expected_shapes(cfg).items()}
    direction = {k: torch.randn(s, generator=gen) for k, s in gradient_shapes(cfg, mode).items()}
    return stack_perturbed(state, direction, (1e-3, -1e-3), cfg, dtype, device)


def matmul_params(cfg: ProxyConfig) -> int:
    """Parameters read by matmuls per step (embedding rows are gathered, the LM head is read whole)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h + 3 * h * i
    return cfg.num_layers * per_layer + cfg.vocab_size * h


def step_cost(cfg: ProxyConfig, copies: int, batch: int, context: int, elem: int) -> tuple[float, float]:
    """(bytes, FLOPs) of one decode step: weights + KV read, matmuls + attention."""
    kv_bytes = copies * batch * context * cfg.kv_bytes_per_token // 4 * elem
    weight_bytes = copies * matmul_params(cfg) * elem
    flops = (
        2 * copies * batch * matmul_params(cfg)
        + 4 * copies * batch * context * cfg.num_layers * cfg.num_heads * cfg.head_dim
    )
    return float(weight_bytes + kv_bytes), float(flops)


def machine_roofline(device: str, dtype: torch.dtype) -> tuple[float, float]:
    """(bytes/s, FLOP/s) measured here: a large copy and a large matmul."""
    bw = copy_bandwidth(device, 256 * 2**20, 5)
    a = torch.randn(2048, 2048, dtype=dtype, device=device)
    flops = 2 * 2048**3 / median_seconds(lambda: a @ a, 5, device, warmup=1)
    return bw, flops


def decode_fn(
    models: list[StackedProxy], batch: int, context: int, device: str, attention: AttentionPath = "reference"
) -> Callable[[], object]:
    """A step function for ``models`` run in sequence (one model = one batched pass); the plan is
    built from the block tables every step, as the engine does."""
    caches = []
    for model in models:
        cache = ProxyKVCache(model.cfg, model.layer_copies, model.dtype, batch * (context + 16), 16, device)
        for r in range(batch):
            cache.add(r, [0] * (context + 1))
            cache.reserve(cache.rows[r], context + 1)
        caches.append(cache)
    paged = caches[0].paged([caches[0].rows[r] for r in range(batch)])

    def step() -> torch.Tensor:
        plan = build_plan([[1]] * batch, [context] * batch, paged, None, device, attention)
        logits = torch.cat([m.logits(plan, c.store) for m, c in zip(models, caches, strict=True)])
        if logits.shape[0] == 2:
            return finite_difference(logits, 1e-2)
        return torch.log_softmax(logits.float(), dim=-1)

    return step


def engine_rows(
    model: StackedProxy, batch: int, context: int, shared: int, steps: int, attention: AttentionPath = "reference"
) -> tuple[ProxyEngine, list[list[int]], int]:
    """An engine holding ``batch`` rows of ``context`` prompt tokens whose first ``shared`` are common,
    with their prompts marked computed (random KV: values do not change the cost), so the next
    step is a decode step. Returns it, the rows' live outputs, and the prompt tokens a real first
    step would have computed (what prefix sharing saves)."""
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, model.cfg.vocab_size, (shared,), generator=gen).tolist()
    engine = ProxyEngine(model, 1e-2, token_budget=batch * (context + 16 + steps), attention=attention)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    prefill = 0
    for r in range(batch):
        prompt = prefix + torch.randint(0, model.cfg.vocab_size, (context - shared,), generator=gen).tolist()
        engine.add(r, prompt, outputs[r])
        row = engine.cache.rows[r]
        engine.cache.reserve(row, context)
        prefill += context - row.computed
        engine.cache.mark_written(row, row.computed, context)
        row.computed = context
    return engine, outputs, prefill


def shared_prefix_run(args: argparse.Namespace, model: StackedProxy) -> list[dict]:
    """Batch × context with and without a shared prefix: tokens held, prefill to compute, decode step time."""
    points = []
    print(f"{'batch':>5} {'ctx':>5} {'shared':>6} {'tokens held':>11} {'prefill':>8} {'decode ms':>9}")
    for context in args.contexts:
        for batch in args.batches:
            for shared in (0, min(args.shared_prefix, context - 1)):
                engine, outputs, prefill = engine_rows(model, batch, context, shared, args.iters + 1, args.attention[0])
                held = engine.cache.used_tokens

                def step(engine: ProxyEngine = engine, outputs: list[list[int]] = outputs) -> object:
                    for out in outputs:
                        out.append(1)
                    return engine.step(range(len(outputs)))

                ms = 1e3 * median_seconds(step, args.iters, args.device, warmup=1)
                point = dict(batch=batch, context=context, shared_prefix=shared, tokens_held=held)
                points.append(point | dict(prefill_tokens=prefill, decode_ms=ms))
                print(f"{batch:>5} {context:>5} {shared:>6} {held:>11} {prefill:>8} {ms:>9.1f}", flush=True)
                del engine, outputs, step
                gc.collect()
    return points


def run(args: argparse.Namespace) -> dict:
    cfg = parse_config({**SHAPES[args.shape], "max_position_embeddings": 8192}, args.shape)
    dtype = DTYPES[args.dtype]
    elem = torch.tensor([], dtype=dtype).element_size()
    bw, peak = machine_roofline(args.device, dtype)
    print(f"{args.shape} {args.dtype} on {args.device}: measured {bw / 1e9:.1f} GB/s, {peak / 1e9:.0f} GFLOP/s")
    base_gemm, *other_gemms = args.gemm
    params = random_params(cfg, 2, dtype, args.device)
    two = StackedProxy(cfg, params, args.device, base_gemm)
    if args.shared_prefix:
        points = shared_prefix_run(args, two)
        return dict(
            shape=args.shape, dtype=args.dtype, device=args.device, attention=args.attention[0], shared_prefix=points
        )
    one = StackedProxy(cfg, random_params(cfg, 1, dtype, args.device), args.device, base_gemm)
    base, *others = args.attention
    modes = {
        "one_copy": ([one], "reference"),
        "two_batched": ([two], base),
        "two_sequential": ([one, one], "reference"),
    }
    # further variants of the batched pass: (its models, attention path, the baseline it is a ratio to)
    variants = {path: ([two], path, base) for path in others}
    variants |= {f"gemm_{g}": ([StackedProxy(cfg, params, args.device, g)], base, base_gemm) for g in other_gemms}
    variants |= {
        f"mode_{str(m).replace(':', '')}": (
            [StackedProxy(cfg, mode_params(cfg, m, dtype, args.device), args.device)],
            base,
            base,
        )
        for m in args.delta_modes
    }
    modes |= {f"two_batched_{v}": (models, path) for v, (models, path, _) in variants.items()}
    ratio = {v: f"{v}_over_{baseline}" for v, (_, _, baseline) in variants.items()}
    points = []
    extra = "".join(f" {v + ' ms':>10} {v + '/base':>8} {'1st s':>6}" for v in variants)
    header = (
        f"{'batch':>5} {'ctx':>5} {'one ms':>8} {'batched ms':>10} {'seq ms':>8} {'bat/seq':>7} {'bat/one':>7} "
        f"{'GB/step':>7} {'GFLOP':>6} {'roof ms':>8} {'% roof':>6}{extra}"
    )
    print(f"batched = two copies, attention {base!r}, GEMMs {base_gemm!r}")
    print(header)
    for context in args.contexts:
        for batch in args.batches:
            ms, first = {}, {}
            for name, (models, path) in modes.items():
                fn = decode_fn(models, batch, context, args.device, path)
                first[name] = first_call_seconds(fn, args.device)
                ms[name] = 1e3 * median_seconds(fn, args.iters, args.device)
                del fn
                gc.collect()
            nbytes, flops = step_cost(cfg, 2, batch, context, elem)
            roof_ms = 1e3 * max(nbytes / bw, flops / peak)
            point = dict(
                batch=batch,
                context=context,
                attention=base,
                **{f"{k}_ms": v for k, v in ms.items()},
                batched_over_sequential=ms["two_batched"] / ms["two_sequential"],
                batched_over_one=ms["two_batched"] / ms["one_copy"],
                step_bytes=nbytes,
                step_flops=flops,
                roofline_ms=roof_ms,
                share_of_roofline=roof_ms / ms["two_batched"],
            )
            for v in variants:
                point[ratio[v]] = ms[f"two_batched_{v}"] / ms["two_batched"]
                point[f"{v}_first_call_s"] = first[f"two_batched_{v}"]
            points.append(point)
            cells = "".join(
                f" {ms[f'two_batched_{v}']:>10.1f} {point[ratio[v]]:>8.2f} {first[f'two_batched_{v}']:>6.1f}"
                for v in variants
            )
            print(
                f"{batch:>5} {context:>5} {ms['one_copy']:>8.1f} {ms['two_batched']:>10.1f} "
                f"{ms['two_sequential']:>8.1f} "
                f"{point['batched_over_sequential']:>7.2f} {point['batched_over_one']:>7.2f} "
                f"{nbytes / 1e9:>7.2f} {flops / 1e9:>6.1f} {roof_ms:>8.1f} "
                f"{100 * point['share_of_roofline']:>5.0f}%{cells}",
                flush=True,
            )
    return dict(
        shape=args.shape,
        dtype=args.dtype,
        device=args.device,
        machine=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        gemm="packed" if two.linears else "matmul",
        gemm_variants=other_gemms,
        allocator=os.environ.get(TUNABLES_ENV) or os.environ.get("LD_PRELOAD") or "default",
        measured_bytes_per_s=bw,
        measured_flops=peak,
        points=points,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--iters", type=int, default=5)
    for flag, choices, what in (
        ("--attention", ATTENTION_PATHS, "attention paths"),
        ("--gemm", GEMM_PATHS, "weight layouts"),
    ):
        ap.add_argument(
            flag,
            choices=choices,
            nargs="+",
            default=[choices[0]],
            help=f"{what} of the batched pass, side by side (the first is the baseline)",
        )
    ap.add_argument(
        "--delta-modes",
        type=DeltaMode.parse,
        nargs="+",
        default=[],
        help="restricted Δ modes (head, last:K) of the batched pass, side by side with the full mode's",
    )
    ap.add_argument("--shared-prefix", type=int, default=0, help="engine steps with/without this many shared tokens")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.device == "cpu":
        for line in apply_engine_env(allocator_env(os.environ)):
            print(line)
    result = run(args)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
