"""The prepared GPU check: Δ of the fast attention path vs the reference, step latency, host
syncs and the share of the bandwidth floor, for random-weight Qwen2.5-0.5B/-1.5B-shaped proxies
in bf16 and fp32, plus a 7B-shaped dense forward standing in for the teacher's step.

    python -m antidistill.benchmarks.gpu_check --out gpu-check            # on a CUDA machine, ≤ 8 min
    python -m antidistill.benchmarks.gpu_check --device cpu --smoke --out /tmp/gc   # tiny shapes, seconds

It needs torch (with numpy and safetensors, which the proxy's modules import) and never vLLM:
nothing it imports imports vLLM, so it runs on a bare CUDA image where vLLM cannot be installed.
On such a machine, run it from a checkout that is not installed by linking the checkout in as the
``antidistill`` namespace (the mapping an install makes, see docs/benchmarks.md)::

    mkdir -p /tmp/ad && ln -sfn "$PWD" /tmp/ad/antidistill
    PYTHONPATH=/tmp/ad python -m antidistill.benchmarks.gpu_check --out gpu-check

Each point (shape × dtype × batch × context) builds an engine whose rows already hold ``context``
tokens of seeded random KV (values do not change the cost; the seed makes the fp32 and bf16 states
the same), then runs whole decode steps (one new token per row: plan, forward, Δ). The first step
of every attention path starts from the same state, so their Δ are compared there: relative error
‖Δ_path − Δ_ref‖ / ‖Δ_ref‖ against the reference path in the same dtype, and, for bf16, against the
fp32 reference (the bf16 error of a fast path should be no worse than the reference's). Host syncs
are counted with ``torch.cuda.set_sync_debug_mode("warn")`` over one steady step, by source line.
``--budget-seconds`` stops cleanly: results are written after every point, and points that did not
fit are listed as skipped.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from antidistill.benchmarks.gpu_graphs import count_syncs, graph_replay
from antidistill.benchmarks.gpu_models import (
    EPSILON,
    SMOKE_SHAPES,
    SMOKE_TEACHER,
    TEACHER_SHAPE,
    cast_params,
    random_params,
    shape_config,
)
from antidistill.benchmarks.gpu_report import Report, print_point
from antidistill.benchmarks.gpu_steps import BLOCK, build_rows, forward_fn, rel_err
from antidistill.benchmarks.proxy_step import SHAPES, step_cost
from antidistill.benchmarks.timing import copy_bandwidth, median_seconds
from antidistill.proxy_worker.core.config import ProxyConfig
from antidistill.proxy_worker.core.model import StackedProxy, step_bytes
from antidistill.proxy_worker.core.plan import ATTENTION_PATHS
from antidistill.proxy_worker.core.weights import expected_shapes


def kv_bytes(cfg: ProxyConfig, copies: int, tokens: int, elem: int) -> int:
    """Bytes of KV ``tokens`` take in ``copies`` copies at ``elem`` bytes per value."""
    return copies * tokens * cfg.kv_bytes_per_token // 4 * elem


def fits(device: str, need: int) -> bool:
    """Whether ``need`` more bytes fit on the device with a margin (always true on the CPU)."""
    if not device.startswith("cuda"):
        return True
    free, _total = torch.cuda.mem_get_info()
    return need < 0.9 * free


@dataclass
class Budget:
    """Wall-clock guard: a stage runs only if the time it last took still fits."""

    seconds: float
    start: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, estimate: float) -> bool:
        return self.elapsed() + estimate <= self.seconds


def run_point(
    shape: str,
    models: dict[str, StackedProxy],
    paths: list[str],
    batch: int,
    context: int,
    args: argparse.Namespace,
    budget: Budget,
) -> list[dict]:
    """Every dtype × path at one (batch, context): Δ compared on the first step, then timed steps."""
    cfg = next(iter(models.values())).cfg
    seed = 1000 * batch + context
    steps = 2 + args.warmup + args.iters
    first: dict[tuple[str, str], torch.Tensor] = {}
    points = []
    for dtype, model in models.items():
        elem = model.params["embed"].element_size()
        need = kv_bytes(cfg, 2, batch * (context + steps + 2 * BLOCK), elem)
        need += step_bytes(cfg, 2, elem, [1] * batch, [context + steps] * batch, BLOCK)
        if not fits(args.device, need):
            report_skip = f"{shape} {dtype} B={batch} ctx={context}: needs {need / 2**30:.1f} GiB more than is free"
            points.append(dict(skipped=report_skip))
            continue
        nbytes, _flops = step_cost(cfg, 2, batch, context, elem)
        for path in paths:
            if not budget.allows(0.0):
                points.append(dict(skipped=f"{shape} {dtype} B={batch} ctx={context} {path}: over the budget"))
                continue
            try:
                rows = build_rows(model, path, batch, context, steps, seed)
                first[dtype, path] = rows.step()
                ms = 1e3 * median_seconds(rows.step, args.iters, args.device, warmup=args.warmup)
                syncs, sites = count_syncs(rows.step, args.device)
            except Exception as exc:  # a path that breaks is a finding, not the end of the check
                what = f"{shape} {dtype} B={batch} ctx={context} {path}"
                points.append(dict(skipped=f"{what}: {type(exc).__name__}: {exc}"))
                continue
            finally:
                rows = None
                gc.collect()
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            floor_ms = 1e3 * nbytes / args.bandwidth
            point = dict(
                shape=shape,
                dtype=dtype,
                batch=batch,
                context=context,
                path=path,
                step_ms=ms,
                floor_ms=floor_ms,
                floor_share=floor_ms / ms,
                step_bytes=nbytes,
                syncs=syncs,
                sync_sites=sites,
            )
            if args.graphs:
                point["graph"] = graph_replay(model, batch, context, path, args.device, args.iters)
            points.append(point)
    for point in points:
        if "skipped" in point:
            continue
        mine, ref = first.get((point["dtype"], point["path"])), first.get((point["dtype"], "reference"))
        point["rel_err_vs_reference"] = None if ref is None or point["path"] == "reference" else rel_err(mine, ref)
        truth = first.get(("float32", "reference"))
        point["rel_err_vs_fp32"] = None if truth is None or point["dtype"] == "float32" else rel_err(mine, truth)
        point["delta_finite"] = bool(torch.isfinite(mine).all())
    for point in points:
        if point.get("path") not in (None, "reference") and point["rel_err_vs_fp32"] is not None:
            ref = next((q for q in points if q.get("path") == "reference" and q.get("dtype") == point["dtype"]), None)
            if ref is not None and ref["rel_err_vs_fp32"]:
                point["bf16_err_ratio"] = point["rel_err_vs_fp32"] / ref["rel_err_vs_fp32"]
    del first
    return points


def teacher_point(model: StackedProxy, batch: int, context: int, args: argparse.Namespace) -> dict | None:
    """The 7B-shaped forward's decode step (one copy, zero KV: the cost does not depend on values)."""
    cfg = model.cfg
    elem = model.params["embed"].element_size()
    need = kv_bytes(cfg, 1, batch * (context + 16), elem) + step_bytes(cfg, 1, elem, [1] * batch, [context + 1] * batch)
    if not fits(args.device, need):
        return None
    step = forward_fn(model, batch, context, args.device)
    step()
    ms = 1e3 * median_seconds(step, args.iters, args.device)
    del step
    gc.collect()
    nbytes, _flops = step_cost(cfg, 1, batch, context, elem)
    dtype = str(model.dtype).removeprefix("torch.")
    return dict(dtype=dtype, batch=batch, context=context, step_ms=ms, floor_ms=1e3 * nbytes / args.bandwidth)


def run(args: argparse.Namespace) -> Report:
    """Every shape × point the budget allows, then the teacher stand-in after the first shape."""
    budget = Budget(args.budget_seconds)
    torch.manual_seed(0)
    paths = args.attention
    attention = f"attention paths: {', '.join(paths)}"
    args.bandwidth = copy_bandwidth(args.device, (64 if args.smoke else 1024) * 2**20, 10)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = dict(
        device=args.device,
        device_name=name,
        torch=torch.__version__,
        platform=platform.platform(),
        bandwidth_gbs=args.bandwidth / 1e9,
        attention=attention,
        paths=paths,
        dtypes=args.dtypes,
        iters=args.iters,
        budget_seconds=args.budget_seconds,
        vllm_imported="vllm" in sys.modules,
    )
    report = Report(args.out, meta)
    print(f"gpu check on {name}: {args.bandwidth / 1e9:.0f} GB/s copy bandwidth; {attention}", flush=True)
    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes}
    max_positions = max(args.contexts) + 2 * BLOCK + args.iters + args.warmup + 8
    teacher_done = False
    for shape, raw in shapes.items():
        cfg = shape_config(raw, max_positions)
        base = random_params(cfg, (EPSILON, -EPSILON), torch.float32, args.device, seed=7)
        models = {}
        for dtype in args.dtypes:
            params = base if dtype == "float32" else cast_params(base, getattr(torch, dtype), cfg.tie_word_embeddings)
            models[dtype] = StackedProxy(cfg, params, args.device)
        if "float32" not in args.dtypes:
            base = None
        last = 0.0
        for context in args.contexts:
            for batch in args.batches:
                label = f"{shape} B={batch} ctx={context}"
                if not budget.allows(last):
                    report.skipped.append(f"{label}: over the {args.budget_seconds:.0f} s budget")
                    continue
                began = time.monotonic()
                for point in run_point(shape, models, paths, batch, context, args, budget):
                    if "skipped" in point:
                        report.skipped.append(point["skipped"])
                        print("skipped:", point["skipped"], flush=True)
                    else:
                        report.points.append(point)
                        print_point(point)
                last = time.monotonic() - began
                report.meta["elapsed_s"] = budget.elapsed()
                report.write()
        models = base = None
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if not teacher_done and args.teacher:
            teacher_done = True
            run_teacher(report, budget, args, max_positions)
    report.complete = not report.skipped
    report.meta["elapsed_s"] = budget.elapsed()
    report.write()
    return report


def run_teacher(report: Report, budget: Budget, args: argparse.Namespace, max_positions: int) -> None:
    """The 7B-shaped stand-in at the proxy's points (bf16, or the first dtype asked for)."""
    cfg = shape_config(SMOKE_TEACHER if args.smoke else TEACHER_SHAPE, max_positions)
    dtype = "bfloat16" if "bfloat16" in args.dtypes else args.dtypes[0]
    if not fits(args.device, int(1.1 * sum(math.prod(s) for s in expected_shapes(cfg).values()) * 2)):
        report.skipped.append("teacher stand-in: its weights do not fit")
        return
    model = StackedProxy(cfg, random_params(cfg, (0.0,), getattr(torch, dtype), args.device, seed=3), args.device)
    last = 0.0
    for context in args.contexts:
        for batch in args.batches:
            if not budget.allows(last):
                report.skipped.append(f"teacher B={batch} ctx={context}: over the budget")
                continue
            began = time.monotonic()
            point = teacher_point(model, batch, context, args)
            last = time.monotonic() - began
            if point is None:
                report.skipped.append(f"teacher B={batch} ctx={context}: does not fit in memory")
                continue
            proxy = next((p for p in report.points if _same_step(p, dtype, batch, context)), None)
            if proxy is not None:
                point["ratio_measured"] = point["step_ms"] / (point["step_ms"] + proxy["step_ms"])
                point["ratio_floor"] = point["floor_ms"] / (point["floor_ms"] + proxy["floor_ms"])
            report.teacher.append(point)
            print(f"teacher {dtype} B={batch} ctx={context}: {point['step_ms']:.2f} ms (floor {point['floor_ms']:.2f})")
            report.meta["elapsed_s"] = budget.elapsed()
            report.write()
    del model
    gc.collect()


def _same_step(point: dict, dtype: str, batch: int, context: int) -> bool:
    """The reference proxy step (1.5B, or the smoke proxy) the teacher stand-in is paired with."""
    same = (point["dtype"], point["batch"], point["context"], point["path"]) == (dtype, batch, context, "reference")
    return same and point["shape"] in ("qwen2.5-1.5b", "smoke-proxy")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (seconds on a CPU): the script is known to run")
    ap.add_argument("--shapes", nargs="+", default=["qwen2.5-1.5b", "qwen2.5-0.5b"], choices=sorted(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--contexts", type=int, nargs="+")
    ap.add_argument(
        "--attention",
        nargs="+",
        choices=ATTENTION_PATHS,
        default=list(ATTENTION_PATHS),
        help="paths to run (default: all)",
    )
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--graphs", action="store_true", help="also capture one decode forward in a CUDA graph")
    ap.add_argument("--no-teacher", dest="teacher", action="store_false", help="skip the 7B-shaped stand-in")
    ap.add_argument("--budget-seconds", type=float, default=420.0, help="stop starting new points after this")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.batches is None:
        args.batches = [1, 4] if args.smoke else [1, 8, 32, 128]
    if args.contexts is None:
        args.contexts = [32, 80] if args.smoke else [1024, 4096]
    if args.smoke:
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)
    if "float32" in args.dtypes:  # the fp32 reference is the ground truth of the bf16 errors: run it first
        args.dtypes = ["float32", *[d for d in args.dtypes if d != "float32"]]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """0 if anything was measured, 1 if nothing was, 2 without the CUDA device asked for."""
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu check: no CUDA device (use --device cpu --smoke to check the script itself)", file=sys.stderr)
        return 2
    report = run(args)
    if args.out is not None:
        print(f"wrote {args.out / 'gpu_check.md'} and {args.out / 'gpu_check.json'}")
    return 0 if report.points else 1


if __name__ == "__main__":
    sys.exit(main())
