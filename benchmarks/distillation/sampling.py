"""Sampling the teacher through the processor we serve with (proxy_worker/runtime/offline.py, the
same processor the server runs): the engine's settings, and the bodies of the two stages that share
it — ``sweep`` (teacher accuracy against b, which places the grid's budget fractions: config.py) and
``traces`` (every grid run's distill and test traces)."""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from antidistill.benchmarks.distillation import scoring
from antidistill.benchmarks.distillation.budget import budget_strength
from antidistill.benchmarks.distillation.config import EvalConfig, budget_fraction
from antidistill.benchmarks.distillation.run_dir import Point, RunDir, run_name, write_jsonl
from antidistill.benchmarks.distillation.tasks import prompt_of
from antidistill.proxy_worker.core.answers import extract_answer
from antidistill.proxy_worker.core.trace_quality import trace_quality
from antidistill.proxy_worker.runtime.offline import OfflineEngine, TraceRequest, offline_engine

log = logging.getLogger("antidistill.eval")
PROFILE = "eval"

TRACE_SEEDS = "common-random-numbers"
"""How request seeds are derived (``request_seed``); part of the traces' fingerprint, so traces
sampled under another derivation are resampled rather than mixed with these."""
TRACE_RECORD = "quality-v1"
"""What a run's ``traces/<run>.json`` holds (``quality-v1``: trace quality and samples); part of the
fingerprint too, so runs recorded without them are resampled rather than reported without them.
``teacher_correct`` (per test problem) was added later without a new tag: resampling every finished
run for it would cost each its traces stage, so runs sampled before it lack it and the report reads
their intervals over seeds only (bootstrap.py)."""
SAMPLE_TRACES = 3  # traces kept per run for the report (the same distill problems at every point)

Engine = Callable[[], OfflineEngine]  # the shared engine, started on first call


class SweepFailed(RuntimeError):
    """The sweep found no b within the teacher budget: the grid's budget fractions cannot be placed."""


def processor_settings(proxy: Path, gradient: Path, epsilon: float, max_lambda: float, budget: int) -> dict:
    """The ``antidistillation`` settings object, exactly as ``antidistill serve`` would pass it."""
    return {
        "proxy": str(proxy),
        "profiles": {PROFILE: {"gradient": str(gradient), "epsilon": epsilon}},
        "allowed_modes": ["ad", "permutation"],
        "max_lambda": max_lambda,
        "token_budget": budget,
    }


def largest_strength(cfg: EvalConfig) -> float:
    """The largest b any stage of this config can request (a budget fraction times at most the largest swept b)."""
    grid, sweep = cfg.grid, cfg.sweep
    values = [v for mode in ("antidistillation", "permutation") for v in getattr(grid, mode)]
    numbers = [float(v) for v in values if not isinstance(v, str)]
    fractions = [budget_fraction(v) or 0.0 for v in values if isinstance(v, str)]
    swept = max(sweep.values) * max([1.0, *fractions]) if sweep is not None else 0.0
    return max([0.0, swept, *numbers])


def teacher_engine(run: RunDir) -> AbstractContextManager[OfflineEngine]:
    """The teacher in vLLM with the processor, the proxy and g, allowing every λ the config can ask for."""
    grad = json.loads(run.path("gradient.json").read_text())
    s = run.cfg.sampling
    settings = (
        processor_settings(
            run.path("models", "proxy"),
            run.path("gradient.safetensors"),
            grad["epsilon"],
            largest_strength(run.cfg) / grad["scale"] + 1.0,
            s.proxy_token_budget,
        )
        | s.processor
    )
    engine_args = {
        "dtype": s.dtype,
        "enforce_eager": s.enforce_eager,
        "max_model_len": s.max_model_len,
        "max_num_seqs": s.max_num_seqs,
        "kv_cache_gib": s.kv_cache_gib,
        **s.engine_args,
    }
    return offline_engine(run.path("models", "teacher"), settings, seed=run.cfg.seed, engine_args=engine_args)


def request_seed(config_seed: int, seed: int, split: str, index: int) -> int:
    """A trace request's sampling seed: a function of (seed, split, problem) only, never of the mode
    or its value, so every mode at one seed draws the same random stream (common random numbers):
    differences between modes at a seed are the modes', not sampling noise."""
    return zlib.crc32(json.dumps([config_seed, seed, split, index]).encode())


def make_sweep(run: RunDir, engine: Engine) -> dict[str, Any]:
    """Teacher accuracy against b on the first ``sweep.problems`` distill prompts (SweepSpec), and
    the budget's b: the largest swept value within ``sweep.budget`` of the λ = 0 accuracy."""
    sweep, s = run.cfg.sweep, run.cfg.sampling
    assert sweep is not None
    scale = json.loads(run.path("gradient.json").read_text())["scale"]
    problems = run.problems("distill")[: sweep.problems]
    tok = run.tokenizer()
    prompts = [tok(prompt_of(p))["input_ids"] for p in problems]
    values = [0.0, *sweep.values]
    requests = [
        TraceRequest(ids, s.temperature, b / scale, "ad", request_seed(run.cfg.seed, 0, "sweep", i))
        for b in values
        for i, ids in enumerate(prompts)
    ]
    texts = [c.text for c in engine().generate(requests, top_p=s.top_p, max_tokens=s.max_tokens)]
    n = len(problems)
    accuracy = [scoring.accuracy(texts[k * n : (k + 1) * n], problems) for k in range(len(values))]
    b_budget = budget_strength(sweep.values, accuracy[1:], accuracy[0], sweep.budget)
    result = {
        "temperature": s.temperature,
        "problems": n,
        "budget": sweep.budget,
        "scale": scale,
        "points": [{"b": b, "lambda": b / scale, "teacher_accuracy": a} for b, a in zip(values, accuracy, strict=True)],
        "b_budget": b_budget,
        "bracketed": b_budget < sweep.values[-1],
    }
    run.path("sweep.json").write_text(json.dumps(result, indent=2))
    if b_budget == 0:
        raise SweepFailed(
            f"sweep: the smallest b ({sweep.values[0]:g}) already costs the teacher "
            f"{100 * (accuracy[0] - accuracy[1]):.1f} points (budget {100 * sweep.budget:g}): "
            "add smaller values to sweep.values"
        )
    if not result["bracketed"]:
        log.warning("sweep: every value is within the budget; add larger values to find its edge")
    return {"b_budget": b_budget, "base_accuracy": accuracy[0], "bracketed": result["bracketed"]}


def grid_requests(
    run: RunDir, tok: Any, scale: float, points: Sequence[Point]
) -> tuple[list[TraceRequest], list[tuple[str, str, int]]]:
    """The grid runs' distill and test prompts as requests, with (run, split, index) labels. Each
    request has a seed of its own (``request_seed``), so that a rerun samples the same traces
    (vLLM's engine-wide seed alone depends on how requests are batched)."""
    s = run.cfg.sampling
    requests, labels = [], []
    prompts = {split: [tok(prompt_of(p))["input_ids"] for p in run.problems(split)] for split in ("distill", "test")}
    for mode, value, seed in points:
        if mode == "temperature":
            tau, lam, ad_mode = value, 0.0, "ad"
        else:
            tau, lam, ad_mode = s.temperature, value / scale, "ad" if mode == "antidistillation" else "permutation"
        for split, ids_list in prompts.items():
            for i, ids in enumerate(ids_list):
                label = (run_name(mode, value, seed), split, i)
                requests.append(TraceRequest(ids, tau, lam, ad_mode, request_seed(run.cfg.seed, seed, split, i)))
                labels.append(label)
    return requests, labels


def make_traces(run: RunDir, engine: Engine, upstream: str) -> dict[str, Any]:
    """Traces for every grid run that lacks them. Runs already sampled are kept while what they
    were sampled from (teacher, proxy, gradient, sampling settings: the ``upstream`` fingerprint)
    is unchanged, since each request's own seed makes a run's traces the same whichever runs share
    the engine: a new point or seed costs only its own requests."""
    traces = run.path("traces")
    stamp = traces / "upstream.txt"
    if traces.is_dir() and not (stamp.is_file() and stamp.read_text() == upstream):
        shutil.rmtree(traces)
    traces.mkdir(exist_ok=True)
    stamp.write_text(upstream)
    points = run.cfg.grid.points()
    # a run's .json is written after its .jsonl: it marks the run complete
    missing = [p for p in points if not (traces / f"{run_name(*p)}.json").is_file()]
    if not missing:
        return {"runs": 0, "requests": 0, "kept": len(points)}
    grad = json.loads(run.path("gradient.json").read_text())
    tok = run.tokenizer()
    requests, labels = grid_requests(run, tok, grad["scale"], missing)
    s = run.cfg.sampling
    teacher = engine()
    completions = teacher.generate(requests, top_p=s.top_p, max_tokens=s.max_tokens)
    scored = [j for j, (_, split, _) in enumerate(labels) if split == "distill"]  # what students see
    logprobs = teacher.token_logprobs(
        [requests[j].prompt_ids for j in scored], [completions[j].token_ids for j in scored]
    )
    scores = dict(zip(scored, logprobs, strict=True))
    problems = {split: run.problems(split) for split in ("distill", "test")}
    by_run: dict[str, dict[str, list]] = {}
    for j, ((name, split, i), req, done) in enumerate(zip(labels, requests, completions, strict=True)):
        parts = by_run.setdefault(name, {"distill": [], "test": [], "request": req, "scored": []})
        parts[split].append((i, done.text))
        if split == "distill":
            parts["scored"].append(j)
    for name, parts in by_run.items():
        rows = [
            {"prompt": prompt_of(problems["distill"][i]), "completion": t, "answer": problems["distill"][i]["answer"]}
            for i, t in parts["distill"]
        ]
        write_jsonl(run.path("traces", f"{name}.jsonl"), rows)
        req = parts["request"]
        teacher_correct = scoring.correctness([t for _, t in parts["test"]], problems["test"])
        meta = {
            "temperature": req.temperature,
            "lambda": req.lam,
            "ad_mode": req.mode,
            "teacher_accuracy": sum(teacher_correct) / len(teacher_correct),
            "teacher_correct": teacher_correct,
            "trace_accuracy": scoring.accuracy([r["completion"] for r in rows], problems["distill"]),
            "mean_trace_chars": sum(len(r["completion"]) for r in rows) / len(rows),
            "quality": trace_quality(
                [completions[j].token_ids for j in parts["scored"]],
                [scores[j] for j in parts["scored"]],
                [extract_answer(completions[j].text) is not None for j in parts["scored"]],
            ).as_dict(),
            "samples": [r["completion"] for r in rows[:SAMPLE_TRACES]],
        }
        run.path("traces", f"{name}.json").write_text(json.dumps(meta))
    return {"runs": len(by_run), "requests": len(requests), "kept": len(points) - len(missing)}
