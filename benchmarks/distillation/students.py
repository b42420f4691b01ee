"""The body of a ``student/<run>`` stage — the attack on one grid run: fine-tune the student base on
that run's traces and score it, with the paper's training-vs-held-out check (the held-out NLL
curves of the student and, optionally, of a proxy fine-tuned alike)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from antidistill.benchmarks.distillation import scoring
from antidistill.benchmarks.distillation.run_dir import RunDir, read_jsonl, run_name
from antidistill.benchmarks.distillation.training import completion_nll, fine_tune, tokenized_examples


def distil(run: RunDir, mode: str, value: float, seed: int, out: Path) -> dict[str, Any]:
    """The attack for one grid run: fine-tune the student base on that run's traces, score it."""
    name = run_name(mode, value, seed)
    meta = json.loads(run.path("traces", f"{name}.json").read_text())
    rows = read_jsonl(run.path("traces", f"{name}.jsonl"))
    tok = run.student_tokenizer()
    student = run.load(run.path("models", "student_base"))
    data = tokenized_examples(tok, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    spec, check = run.cfg.student, run.cfg.mechanism
    train_seed = spec.seed + 7919 * seed
    monitor = heldout_monitor(run, tok)
    student, fit = fine_tune(
        student, data, spec.distill, tok.pad_token_id, train_seed, name, monitor, check.checkpoints
    )
    correct = scoring.model_correctness(student, tok, run.problems("test"), run.cfg.answer_tokens)
    acc = sum(correct) / len(correct)
    mechanism = {"student": fit.get("curve")}
    if monitor is not None and check.proxy:
        mechanism["proxy"] = proxy_after_distillation(run, rows, train_seed, name)
    result = {
        "config": run.cfg.name,
        "mode": mode,
        "value": value,
        "seed": seed,
        **meta,
        "student_accuracy": acc,
        "student_correct": correct,
        "n_test": len(correct),
        "n_traces": len(rows),
        "train_loss": fit["final_loss"],
        "mechanism": mechanism,
    }
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result))
    return {"student_accuracy": acc, "teacher_accuracy": meta["teacher_accuracy"]}


def heldout_monitor(run: RunDir, tok: Any) -> Callable[[torch.nn.Module], float] | None:
    """The NLL of the first ``mechanism.heldout_traces`` clean holdout traces (λ = 0 teacher
    traces no student or point trains on) under a model with tokenizer ``tok``; None when off."""
    count = run.cfg.mechanism.heldout_traces
    if count == 0:
        return None
    rows = read_jsonl(run.path("holdout.jsonl"))[:count]
    heldout = tokenized_examples(tok, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    return partial(completion_nll, examples=heldout, pad_id=tok.pad_token_id)


def proxy_after_distillation(run: RunDir, rows: Sequence[dict[str, Any]], seed: int, name: str) -> Any:
    """A copy of the proxy fine-tuned like the student on a point's traces: its held-out NLL curve
    (does what g predicts — the proxy's held-out loss rises — happen to the proxy itself?)."""
    tok = run.tokenizer()
    proxy = run.load(run.path("models", "proxy"))
    data = tokenized_examples(tok, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    spec = run.cfg.student.distill
    monitor = heldout_monitor(run, tok)
    _, fit = fine_tune(
        proxy, data, spec, tok.pad_token_id, seed, f"{name} (proxy)", monitor, run.cfg.mechanism.checkpoints
    )
    return fit["curve"]
