"""Δ modes against the full Δ: how much of its direction and of its protection each keeps, and its cost.

    python -m antidistill.benchmarks.delta_modes --out benchmarks/results/delta-modes-cpu.json   # embedded default
    python -m antidistill.benchmarks.delta_modes --teacher T --proxy P --traces holdout.jsonl --modes head last:2

One proxy, one command, every mode side by side (core/delta_mode.py):

1. **Fidelity per position.** Every g is computed by the gradient tool on the first ``--gradient-traces``
   holdout traces; on the others, teacher-forced, the exact Δ of each mode (forward-mode JVP, no ε)
   is compared with the full mode's over the teacher's top-p tokens at each position: cosine,
   Spearman rank correlation and the norm ratio |Δ_mode| / |Δ_full|.
2. **Dose at equal teacher cost.** Traces are sampled from the teacher with z + λ·Δ_mode at
   temperature τ, the same random stream per prompt for every mode and strength (Gumbel noise drawn
   from a per-prompt generator). Each trace's teacher NLL per token (the raw teacher's) is its
   quality cost and its full-g dose (tools/dose.py) its protection. A mode's dose is interpolated at
   the teacher NLL the full mode reaches at ``--match-strength`` and reported as a fraction of the
   full mode's dose there, with a paired bootstrap interval over prompts.
3. **Cost.** The proxy's decode step (plan + forward + Δ) at 1 and 32 rows, every mode in this run.

The teacher is run with the project's own forward pass (one copy, paged KV): a measurement, not a
parity check (tests/worker/test_delta_modes.py checks the modes against HF).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from antidistill.benchmarks.proxy_step import decode_fn
from antidistill.benchmarks.report import write_json
from antidistill.benchmarks.timing import median_seconds
from antidistill.proxy_worker.core.config import ProxyConfig, load_config
from antidistill.proxy_worker.core.delta import exact_delta
from antidistill.proxy_worker.core.delta_mode import FULL, DeltaMode
from antidistill.proxy_worker.core.model import StackedProxy
from antidistill.proxy_worker.core.plan import build_plan
from antidistill.proxy_worker.core.rope import RotaryTable
from antidistill.proxy_worker.core.weights import load_proxy_state, padded_direction, stack_copies, stack_perturbed
from antidistill.proxy_worker.runtime.cache import ProxyKVCache
from antidistill.proxy_worker.runtime.engine import ProxyEngine
from antidistill.proxy_worker.tools.dose import DoseMeter
from antidistill.proxy_worker.tools.gradient import (
    completion_positions,
    compute_gradient,
    measure_delta_scale,
    tokenize_all,
)
from antidistill.proxy_worker.tools.traces import TokenizedTrace, read_traces
from antidistill.server.startup.cpu_platform import allocator_env, apply_engine_env

BOOTSTRAP = 2000


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ: the Pearson correlation of the ranks (continuous values: ties have measure zero)."""
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Bool [N, V]: the smallest set of most likely tokens whose probability reaches ``p`` (≥ 2 tokens)."""
    probs = torch.softmax(logits.double(), dim=-1)
    order = probs.argsort(dim=-1, descending=True)
    before = probs.gather(-1, order).cumsum(-1) - probs.gather(-1, order)
    keep = before < p
    keep[:, :2] = True
    return torch.zeros_like(keep).scatter(-1, order, keep)


def position_fidelity(mode: torch.Tensor, full: torch.Tensor, mask: torch.Tensor) -> dict[str, list[float]]:
    """Per position (rows): cosine, Spearman and norm ratio of Δ_mode to Δ_full over ``mask``'s tokens."""
    out: dict[str, list[float]] = {"cosine": [], "spearman": [], "norm_ratio": []}
    for m, f, keep in zip(mode.double(), full.double(), mask, strict=True):
        m, f = m[keep], f[keep]
        out["cosine"].append(float(torch.dot(m, f) / (m.norm() * f.norm()).clamp_min(1e-300)))
        out["spearman"].append(spearman(m, f))
        out["norm_ratio"].append(float(m.norm() / f.norm().clamp_min(1e-300)))
    return out


def bootstrap_mean(groups: Sequence[Sequence[float]], seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 %): the mean of all values and a percentile bootstrap over whole groups
    (the positions of one trace are not independent)."""
    flat = [v for g in groups for v in g]
    rng = random.Random(seed)
    means = []
    for _ in range(BOOTSTRAP):
        pick = [v for _ in groups for v in groups[rng.randrange(len(groups))]]
        means.append(sum(pick) / len(pick))
    means.sort()
    return sum(flat) / len(flat), means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP) - 1]


@dataclass
class Proxy:
    cfg: ProxyConfig
    theta: dict[str, torch.Tensor]
    grads: dict[DeltaMode, dict[str, torch.Tensor]]
    scales: dict[DeltaMode, float]


def fidelity(proxy: Proxy, teacher: StackedProxy, traces: Sequence[TokenizedTrace], per_trace: int, p: float) -> dict:
    """Section 1: per mode, the mean (with a bootstrap interval over traces) of each per-position measure."""
    rope = RotaryTable(proxy.cfg)
    directions = {m: padded_direction(proxy.theta, g, proxy.cfg) for m, g in proxy.grads.items()}
    stacked = {
        m: (stack_copies([t], proxy.cfg, torch.float32), stack_copies([d], proxy.cfg, torch.float32))
        for m, (t, d) in directions.items()
    }
    per_mode: dict[DeltaMode, dict[str, list[list[float]]]] = {m: {} for m in proxy.grads if m != FULL}
    positions = 0
    for trace in traces:
        where = torch.tensor(completion_positions(trace, per_trace))
        plan = build_plan([trace.ids], [0])
        mask = top_p_mask(teacher.logits(plan, output=where)[0], p)
        deltas = {m: exact_delta(*stacked[m], proxy.cfg, rope, plan, output=where) for m in proxy.grads}
        positions += len(where)
        for m in per_mode:
            for name, values in position_fidelity(deltas[m], deltas[FULL], mask).items():
                per_mode[m].setdefault(name, []).append(values)
    result = {"positions": positions, "traces": len(traces), "top_p": p, "modes": {}}
    for m, measures in per_mode.items():
        result["modes"][str(m)] = {
            name: dict(zip(("mean", "low", "high"), bootstrap_mean(groups), strict=True))
            for name, groups in measures.items()
        }
    return result


class Decoder:
    """The teacher, one copy, decoding many rows over a paged KV (the proxy's own forward pass)."""

    def __init__(self, model: StackedProxy, token_budget: int) -> None:
        self.model = model
        self.cache = ProxyKVCache(model.cfg, 1, model.dtype, token_budget, 16, model.device)

    def add(self, index: int, prompt: Sequence[int], output: Sequence[int]) -> None:
        self.cache.add(index, prompt, output)

    def remove(self, index: int) -> None:
        self.cache.remove(index)

    @torch.inference_mode()
    def step(self, indices: Sequence[int]) -> torch.Tensor:
        """Next-token logits [B, V] of each row, after computing what it has not computed yet."""
        rows = [self.cache.rows[i] for i in indices]
        for row in rows:
            self.cache.reserve(row, row.length)
        new = [row.tokens(row.computed, row.length) for row in rows]
        plan = build_plan(new, [row.computed for row in rows], self.cache.paged(rows))
        logits = self.model.logits(plan, self.cache.store)[0]
        for row in rows:
            self.cache.mark_written(row, row.computed, row.length)
            row.computed = row.length
        return logits.float()


def sample(
    teacher: StackedProxy,
    engine: ProxyEngine | None,
    prompts: Sequence[list[int]],
    lam: float,
    tau: float,
    tokens: int,
    seed: int,
    eos: int | None,
) -> tuple[list[TokenizedTrace], list[float]]:
    """Traces sampled from softmax((z + λΔ) / τ), prompt i on its own Gumbel stream (seed, i); and each
    trace's mean raw-teacher NLL per emitted token."""
    decoder = Decoder(teacher, sum(len(p) + tokens + 16 for p in prompts))
    outputs: list[list[int]] = [[] for _ in prompts]
    nll: list[list[float]] = [[] for _ in prompts]
    streams = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(len(prompts))]
    for i, prompt in enumerate(prompts):
        decoder.add(i, prompt, outputs[i])
        if engine is not None:
            engine.add(i, prompt, outputs[i])
    live = list(range(len(prompts)))
    for _ in range(tokens):
        if not live:
            break
        z = decoder.step(live)
        logp = torch.log_softmax(z.double(), dim=-1)
        shaped = z.clone()
        if engine is not None and lam:
            shaped += lam * engine.step(live).delta
        for row, i in enumerate(live):
            gumbel = -torch.log(-torch.log(torch.rand(z.shape[-1], generator=streams[i]).clamp(1e-12, 1 - 1e-12)))
            token = int(torch.argmax(shaped[row] / tau + gumbel))
            nll[i].append(-float(logp[row, token]))
            outputs[i].append(token)
        live = [i for i in live if outputs[i][-1] != eos]
    traces = [TokenizedTrace(list(p) + o, len(p)) for p, o in zip(prompts, outputs, strict=True)]
    return traces, [sum(v) / len(v) for v in nll]


def interpolate(x: Sequence[float], y: Sequence[float], at: float) -> float:
    """y at ``at`` on the piecewise-linear curve through (x, y) sorted by x; clamped at the ends."""
    points = sorted(zip(x, y, strict=True))
    if at <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return points[-1][1]


def ratio(a: float, b: float) -> float:
    """a / b, NaN where b is 0 (a bootstrap draw whose prompts all gave the same trace at both points)."""
    return a / b if b else math.nan


def matched_dose(curves: dict[str, dict[float, tuple[list[float], list[float]]]], match: float, seed: int = 0) -> dict:
    """Section 2's verdict: each mode's dose at the full mode's mean teacher NLL at strength ``match``,
    as a fraction of the full mode's dose there (``fraction``) and of what the full mode adds over
    λ = 0 sampling (``fraction_of_added``; every curve starts at the λ = 0 point, strength 0.0); the
    intervals resample prompts (paired: one draw of prompts for every mode and strength)."""

    def fractions(pick: Sequence[int]) -> dict[str, float]:
        def mean(v: Sequence[float]) -> float:
            return sum(v[i] for i in pick) / len(pick)

        full = curves[str(FULL)]
        target, full_dose, plain_dose = mean(full[match][0]), mean(full[match][1]), mean(full[0.0][1])
        out = {}
        for mode, points in curves.items():
            xs = [mean(points[b][0]) for b in sorted(points)]
            ys = [mean(points[b][1]) for b in sorted(points)]
            dose = interpolate(xs, ys, target)
            out[mode] = ratio(dose, full_dose)
            out[mode + "/added"] = ratio(dose - plain_dose, full_dose - plain_dose)
        return out

    n = len(next(iter(curves[str(FULL)].values()))[0])
    point = fractions(range(n))
    rng = random.Random(seed)
    draws = [fractions([rng.randrange(n) for _ in range(n)]) for _ in range(BOOTSTRAP // 4)]
    result: dict[str, dict[str, float]] = {}
    for key, value in point.items():
        values = sorted(d[key] for d in draws if math.isfinite(d[key])) or [math.nan]
        mode, _, added = key.partition("/")
        result.setdefault(mode, {})["fraction_of_added" if added else "fraction"] = value
        result[mode]["added_low" if added else "low"] = values[int(0.025 * len(values))]
        result[mode]["added_high" if added else "high"] = values[int(0.975 * len(values)) - 1]
    return result


def step_times(proxy: Proxy, epsilon: float, batches: Sequence[int], context: int, iters: int) -> list[dict]:
    """Section 3: the proxy decode step per mode and batch, medians of ``iters`` in this process."""
    models = {
        m: StackedProxy(proxy.cfg, stack_perturbed(proxy.theta, g, (epsilon, -epsilon), proxy.cfg, torch.float32))
        for m, g in proxy.grads.items()
    }
    points = []
    for batch in batches:
        ms = {}
        for m, model in models.items():
            fn = decode_fn([model], batch, context, "cpu")
            ms[str(m)] = 1e3 * median_seconds(fn, iters, "cpu", warmup=1)
        points.append(
            {"batch": batch, "context": context, "ms": ms, "over_full": {m: v / ms[str(FULL)] for m, v in ms.items()}}
        )
        print(f"  step at {batch} rows: " + ", ".join(f"{m} {v:.1f} ms" for m, v in ms.items()), flush=True)
    return points


def embedded_paths() -> tuple[Path, Path, Path]:
    from antidistill.server.embedded.setup import prepare

    made = prepare()
    return made.teacher, made.proxy, made.traces


def run(args: argparse.Namespace) -> dict:
    teacher_dir, proxy_dir, traces_path = (args.teacher, args.proxy, args.traces) if args.proxy else embedded_paths()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(proxy_dir)
    cfg = load_config(proxy_dir)
    theta = load_proxy_state(proxy_dir, cfg)
    traces = tokenize_all(tokenizer, read_traces(traces_path), args.max_trace_tokens)
    fit, held = traces[: args.gradient_traces], traces[args.gradient_traces :]
    if not held:
        raise SystemExit(
            f"{traces_path}: {len(traces)} traces, none left after --gradient-traces {args.gradient_traces}"
        )
    modes = [FULL, *args.modes]
    grads, scales = {}, {}
    for mode in modes:
        start = time.time()
        grads[mode], _ = compute_gradient(cfg, theta, fit, mode=mode)
        scales[mode] = measure_delta_scale(cfg, theta, grads[mode], fit)
        print(f"g for {mode}: Δ scale {scales[mode]:.4g} ({time.time() - start:.0f} s)", flush=True)
    proxy = Proxy(cfg, theta, grads, scales)
    tcfg = load_config(teacher_dir)
    teacher = StackedProxy(tcfg, stack_copies([load_proxy_state(teacher_dir, tcfg)], tcfg, torch.float32))

    start = time.time()
    fid = fidelity(proxy, teacher, held, args.positions_per_trace, args.top_p)
    print(f"fidelity on {fid['positions']} positions ({time.time() - start:.0f} s):", flush=True)
    for m, r in fid["modes"].items():
        print(
            "  " + m + ": " + ", ".join(f"{k} {v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for k, v in r.items())
        )

    prompts = [t.ids[: t.prompt_len] for t in held[: args.prompts]]
    meter = DoseMeter(cfg, theta, grads[FULL], scales[FULL])
    curves: dict[str, dict[float, tuple[list[float], list[float]]]] = {}
    start = time.time()
    plain, plain_nll = sample(
        teacher, None, prompts, 0.0, args.temperature, args.tokens, args.seed, tokenizer.eos_token_id
    )
    baseline = (plain_nll, [meter.dose(t) or 0.0 for t in plain])  # λ = 0: the same traces for every mode
    for mode in modes:
        eps = (
            args.epsilon
            * math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads[FULL].values()))
            / math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads[mode].values()))
        )  # the same perturbation size |εg| in every mode
        curves[str(mode)] = {0.0: baseline}
        for strength in args.strengths:
            engine = ProxyEngine(
                StackedProxy(cfg, stack_perturbed(theta, grads[mode], (eps, -eps), cfg, torch.float32)),
                eps,
                sum(len(p) + args.tokens + 16 for p in prompts),
            )
            sampled, nll = sample(
                teacher,
                engine,
                prompts,
                strength / scales[mode],
                args.temperature,
                args.tokens,
                args.seed,
                tokenizer.eos_token_id,
            )
            doses = [meter.dose(t) or 0.0 for t in sampled]
            curves[str(mode)][strength] = (nll, doses)
            print(
                f"  {mode} strength {strength}: teacher NLL {sum(nll) / len(nll):.3f}, "
                f"dose {sum(doses) / len(doses):.4f} "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )
    matched = matched_dose(curves, args.match_strength)
    for m, r in matched.items():
        print(
            f"  dose kept by {m}: {r['fraction']:.2f} [{r['low']:.2f}, {r['high']:.2f}]; of the added dose "
            f"{r['fraction_of_added']:.2f} [{r['added_low']:.2f}, {r['added_high']:.2f}]"
        )
    cost = step_times(proxy, args.epsilon, args.batches, args.context, args.iters)
    return {
        "command": "python -m antidistill.benchmarks.delta_modes " + " ".join(args.argv),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "proxy": {
            "layers": cfg.num_layers,
            "hidden": cfg.hidden_size,
            "vocab": cfg.vocab_size,
            "tied": cfg.tie_word_embeddings,
        },
        "gradient_traces": len(fit),
        "delta_scales": {str(m): s for m, s in scales.items()},
        "fidelity": fid,
        "dose": {
            "temperature": args.temperature,
            "tokens": args.tokens,
            "prompts": len(prompts),
            "match_strength": args.match_strength,
            "curves": {
                m: {str(b): {"teacher_nll": sum(n) / len(n), "dose": sum(d) / len(d)} for b, (n, d) in points.items()}
                for m, points in curves.items()
            },
            "matched": matched,
        },
        "cost": cost,
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", type=Path, help="teacher directory (default: the embedded default's)")
    ap.add_argument("--proxy", type=Path, help="proxy directory (with --teacher and --traces)")
    ap.add_argument("--traces", type=Path, help="holdout traces JSONL")
    ap.add_argument(
        "--modes",
        type=DeltaMode.parse,
        nargs="+",
        default=[DeltaMode.parse(m) for m in ("head", "last:1", "last:2", "last:4", "last:8")],
    )
    ap.add_argument(
        "--gradient-traces", type=int, default=32, help="holdout traces g is computed on; the rest are scored"
    )
    ap.add_argument("--max-trace-tokens", type=int, default=512)
    ap.add_argument("--positions-per-trace", type=int, default=160)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts the dose is sampled on")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.125, 0.25, 0.5])
    ap.add_argument("--match-strength", type=float, default=0.25)
    ap.add_argument("--epsilon", type=float, default=1e-3, help="the full mode's ε (the others: the same |εg|)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.match_strength not in args.strengths:
        ap.error("--match-strength must be one of --strengths")
    for line in apply_engine_env(allocator_env(os.environ)):
        print(line)
    write_json(args.out, run(args))


if __name__ == "__main__":
    main()
