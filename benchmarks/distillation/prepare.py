"""The bodies of the stages before any sampling through the processor — data, tokenizer, teacher,
student base, proxy, holdout, gradient: what the attack runs against. Each takes the run directory,
writes its outputs there and returns what its stage record keeps."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from antidistill.benchmarks.distillation import models, scoring
from antidistill.benchmarks.distillation.config import ModelSpec
from antidistill.benchmarks.distillation.run_dir import RunDir, write_jsonl
from antidistill.benchmarks.distillation.tasks import Problem, make_splits, prompt_of
from antidistill.benchmarks.distillation.training import fine_tune, tokenized_examples

SPLITS = ("test", "holdout", "distill", "train")  # drawn in this order (see make_splits)


def make_data(run: RunDir) -> dict[str, Any]:
    t = run.cfg.task
    sizes = {s: getattr(t, s) for s in SPLITS}
    splits = make_splits(t.kind, t.params, sizes, run.cfg.seed)
    run.path("data").mkdir()
    for name, rows in splits.items():
        write_jsonl(run.path("data", f"{name}.jsonl"), rows)
    return {name: len(rows) for name, rows in splits.items()}


def make_tokenizer(run: RunDir) -> dict[str, Any]:
    """The pretrained teacher's tokenizer, or one trained on the train split's worked solutions."""
    if run.cfg.teacher.path is not None:
        tok = models.load_tokenizer(run.model_path(run.cfg.teacher))
    else:
        texts = [prompt_of(p) + p["solution"] for p in run.problems("train")]
        tok = models.train_tokenizer(texts, run.cfg.tokenizer_vocab)
    tok.save_pretrained(run.path("tokenizer"))
    return {"vocab": len(tok)}


def build(run: RunDir, spec: ModelSpec, tokenizer: Any) -> torch.nn.Module:
    """A model as its spec describes it: a fresh one of ``shape``, or a checkpoint."""
    if spec.shape is not None:
        return models.scratch_model(spec.shape, tokenizer, spec.seed).to(run.cfg.device)
    return run.load(run.model_path(spec), spec.layers)


def train_model(run: RunDir, role: str, spec: ModelSpec, train: Sequence[Problem] | None = None) -> dict[str, Any]:
    """Teacher and proxy: the run's tokenizer, trained on ``train`` (default: the train split's
    worked solutions)."""
    tok = models.load_tokenizer(run.path("tokenizer"))
    model = build(run, spec, tok)
    info: dict[str, Any] = {"parameters": models.parameter_count(model)}
    if spec.train is not None:
        train = run.problems("train") if train is None else train
        data = tokenized_examples(tok, [prompt_of(p) for p in train], [p["solution"] for p in train])
        model, fit = fine_tune(model, data, spec.train, tok.pad_token_id, spec.seed, role)
        info.update(fit, train_problems=len(train))
    models.save(model, tok, run.path("models", role))
    test = run.problems("test")
    info["greedy_test_accuracy"] = scoring.model_accuracy(model, tok, test, run.cfg.answer_tokens)
    return info


def make_proxy(run: RunDir) -> dict[str, Any]:
    """The proxy by its origin (config.ProxySpec): trained on the student's prior data, the student
    base itself, or trained on the teacher's task."""
    origin = run.cfg.proxy.origin
    if origin == "student_base":
        shutil.copytree(run.path("models", "student_base"), run.path("models", "proxy"))
        return {"origin": origin, "parameters": models.parameter_count(run.load(run.path("models", "proxy")))}
    prior = student_prior(run) if origin == "student_prior" else None
    return {"origin": origin, **train_model(run, "proxy", run.cfg.proxy, prior)}


def student_prior(run: RunDir) -> list[Problem]:
    """The student's prior training data (``student.pretrain_task``), never a test problem; the
    same problems for the student base and a ``student_prior`` proxy."""
    pre_task = run.cfg.student.pretrain_task
    if pre_task is None:
        return []
    pre = make_splits(pre_task.kind, pre_task.params, {"train": pre_task.train}, run.cfg.seed + 1)["train"]
    test = {p["question"] for p in run.problems("test")}
    return [p for p in pre if p["question"] not in test]


def make_student_base(run: RunDir) -> dict[str, Any]:
    """The student before distillation: built from its spec, pre-trained on its prior data if any."""
    spec = run.cfg.student
    tok = run.student_tokenizer()
    model = build(run, spec, tok)
    info: dict[str, Any] = {"parameters": models.parameter_count(model)}
    pre_task = spec.pretrain_task
    if spec.train is not None and pre_task is not None:
        pre = student_prior(run)
        write_jsonl(run.path("data", "student_pretrain.jsonl"), pre)
        data = tokenized_examples(tok, [prompt_of(p) for p in pre], [p["solution"] for p in pre])
        model, fit = fine_tune(model, data, spec.train, tok.pad_token_id, spec.seed, "student pre-training")
        info.update(fit)
    models.save(model, tok, run.path("models", "student_base"))
    info["student_accuracy"] = scoring.model_accuracy(model, tok, run.problems("test"), run.cfg.answer_tokens)
    return info


def make_holdout(run: RunDir) -> dict[str, Any]:
    """Plain (λ = 0) teacher traces on the holdout split, sampled through HF: what g is computed on."""
    tok = run.tokenizer()
    teacher = run.load(run.path("models", "teacher"))
    problems = run.problems("holdout")
    prompts = [prompt_of(p) for p in problems]
    s = run.cfg.sampling
    torch.manual_seed(run.cfg.seed)
    texts = scoring.sampled_completions(teacher, tok, prompts, s.max_tokens, s.holdout_temperature, s.top_p)
    rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, texts, strict=True)]
    write_jsonl(run.path("holdout.jsonl"), rows)
    return {"traces": len(texts), "accuracy": scoring.accuracy(texts, problems)}


def make_gradient(run: RunDir) -> dict[str, Any]:
    from antidistill.benchmarks.distillation.proxy_gradient import gradient_and_scale

    info = gradient_and_scale(
        run.path("models", "proxy"),
        run.path("holdout.jsonl"),
        run.path("gradient.safetensors"),
        run.cfg.sampling.epsilons,
    )
    run.path("gradient.json").write_text(json.dumps(info, indent=2))
    return {k: info[k] for k in ("epsilon", "scale", "mean_loss", "traces", "trace_tokens")}
