"""The resumable evaluation: every stage writes its outputs, then a sentinel holding the stage's
fingerprint — a hash of the config sections it reads, chained with the fingerprint of the stage
before it. A rerun skips stages whose sentinel matches, so a killed run redoes only the stage it was
killed in (and those after it), and a config edit redoes only the stages it affects: a new grid
reuses the trained teacher, proxy and gradient, and the traces and students of the runs it keeps.

    data → tokenizer → teacher → student_base → proxy → holdout → gradient → [sweep] → traces
         → student/<mode>@<value>#<seed> (one per grid run) → report

The proxy comes after the student base because it stands where the student stands before
distillation (``proxy.origin``): trained on the student's prior data, or the student base itself.

``holdout`` samples the teacher with plain sampling (λ = 0) through HF — no processor is involved —
while ``sweep`` (teacher accuracy against b, which places the grid's budget fractions: config.py)
and ``traces`` (every grid point) sample through the vLLM processor we serve with, in one engine. The students are
independent of each other; with ``workers`` > 1 they run side by side in processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from antidistill.benchmarks.distillation import models, sampling, scoring, summary
from antidistill.benchmarks.distillation.budget import budget_strength
from antidistill.benchmarks.distillation.config import EvalConfig, ModelSpec, budget_fraction, point_name
from antidistill.benchmarks.distillation.tasks import Problem, make_splits, prompt_of
from antidistill.benchmarks.distillation.training import completion_nll, fine_tune
from antidistill.proxy_worker.core.answers import extract_answer
from antidistill.proxy_worker.core.trace_quality import trace_quality
from antidistill.proxy_worker.runtime.offline import OfflineEngine, TraceRequest, offline_engine
from antidistill.proxy_worker.tools.traces import TokenizedTrace, tokenize_trace
from antidistill.server.embedded.model import DEFAULT_CACHE
from pydantic import BaseModel

log = logging.getLogger("antidistill.eval")
SPLITS = ("test", "holdout", "distill", "train")  # drawn in this order (see make_splits)


Point = tuple[str, float, int]  # (mode, value, seed) of one grid run


class RunDirBusy(RuntimeError):
    """Another process is running a pipeline in the same directory."""


class SweepFailed(RuntimeError):
    """The sweep found no b within the teacher budget: the grid's budget fractions cannot be placed."""


def fingerprint(after: str, reads: Sequence[Any]) -> str:
    """Hash of the previous stage's fingerprint and the config values a stage reads."""
    parts = [r.model_dump(mode="json") if isinstance(r, BaseModel) else r for r in reads]
    return hashlib.sha256(json.dumps([after, parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


TRACE_SEEDS = "common-random-numbers"
"""How request seeds are derived (``request_seed``); part of the traces' fingerprint, so traces
sampled under another derivation are resampled rather than mixed with these."""
TRACE_RECORD = "quality-v1"
"""What a run's ``traces/<run>.json`` holds (``quality-v1``: trace quality and samples); part of the
fingerprint too, so runs recorded without them are resampled rather than reported without them."""
SAMPLE_TRACES = 3  # traces kept per run for the report (the same distill problems at every point)


def request_seed(config_seed: int, seed: int, split: str, index: int) -> int:
    """A trace request's sampling seed: a function of (seed, split, problem) only, never of the mode
    or its value, so every mode at one seed draws the same random stream (common random numbers):
    differences between modes at a seed are the modes', not sampling noise."""
    return zlib.crc32(json.dumps([config_seed, seed, split, index]).encode())


def run_name(mode: str, value: float, seed: int) -> str:
    return f"{point_name(mode, value)}#{seed}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def examples(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]) -> list[TokenizedTrace]:
    """Training sequences: prompt, completion, EOS (the loss covers the completion and EOS)."""
    return [
        tokenize_trace(tokenizer, {"prompt": p, "completion": c}) for p, c in zip(prompts, completions, strict=True)
    ]


class Pipeline:
    """One run directory: ``stages/*.done`` sentinels, data, models, traces, results, report."""

    def __init__(self, cfg: EvalConfig, root: Path) -> None:
        self.cfg = cfg
        self.root = root
        self.executed: list[str] = []
        self._engines: ExitStack | None = None
        self._engine: OfflineEngine | None = None
        root.mkdir(parents=True, exist_ok=True)

    # --- bookkeeping -------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def sentinel(self, stage: str) -> Path:
        return self.path("stages", stage.replace("/", "_") + ".done")

    def is_current(self, name: str, fp: str) -> bool:
        done = self.sentinel(name)
        return done.is_file() and json.loads(done.read_text()).get("fingerprint") == fp

    def stage(
        self,
        name: str,
        outputs: Sequence[Path],
        body: Callable[[], dict[str, Any] | None],
        after: str,
        reads: Sequence[Any],
        quiet: bool = False,
    ) -> str:
        """Run ``body`` unless its sentinel has this fingerprint; stale or partial outputs go first."""
        fp = fingerprint(after, reads)
        done = self.sentinel(name)
        if self.is_current(name, fp):
            if not quiet:
                log.info("[skip] %s (done)", name)
            return fp
        for out in outputs:
            if out.is_dir():
                shutil.rmtree(out)
            elif out.exists():
                out.unlink()
        log.info("[run ] %s", name)
        start = time.time()
        info = body() or {}
        info["seconds"] = round(time.time() - start, 2)
        log.info("[done] %s in %.1f s %s", name, info["seconds"], info)
        done.parent.mkdir(exist_ok=True)
        done.write_text(json.dumps({**info, "fingerprint": fp, "finished": time.time()}))
        self.executed.append(name)
        return fp

    def problems(self, split: str) -> list[Problem]:
        return read_jsonl(self.path("data", f"{split}.jsonl"))

    def tokenizer(self) -> Any:
        return models.load_tokenizer(self.path("models", "teacher"))

    # --- stages ------------------------------------------------------------------------------
    def run(self) -> Path:
        """All stages, holding an exclusive lock on the run directory (two runs would corrupt it)."""
        with (self.root / ".lock").open("w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirBusy(f"{self.root} is being used by another run (lock: {lock.name})") from None
            (self.root / "config.json").write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=2))
            return self._run_stages()

    def _run_stages(self) -> Path:
        c = self.cfg
        if c.threads:
            torch.set_num_threads(c.threads)
        fp = self.stage("data", [self.path("data")], self.make_data, "", [c.seed, c.task])
        tok = self.stage("tokenizer", [self.path("tokenizer")], self.make_tokenizer, fp, [c.tokenizer_vocab, c.teacher])
        teacher = [self.path("models", "teacher")]
        fp = self.stage("teacher", teacher, lambda: self.train_model("teacher", c.teacher), tok, [c.answer_tokens])
        # the student's prior training does not depend on the teacher: it is chained to the tokenizer only
        base = [self.path("models", "student_base"), self.path("data", "student_pretrain.jsonl")]
        student = c.student.model_dump(exclude={"distill"})
        base_fp = self.stage("student_base", base, self.make_student_base, tok, [student, c.answer_tokens])
        fp = self.stage("proxy", [self.path("models", "proxy")], self.make_proxy, fp, self.proxy_reads(base_fp))
        fp = self.stage("holdout", [self.path("holdout.jsonl")], self.make_holdout, fp, [c.sampling, c.task.holdout])
        gradient = [self.path("gradient.safetensors"), self.path("gradient.json")]
        fp = self.stage("gradient", gradient, self.make_gradient, fp, [])
        with self.shared_engine():
            swept = ""
            if c.sweep is not None:
                reads = [c.sweep, c.sampling, TRACE_SEEDS]
                swept = self.stage("sweep", [self.path("sweep.json")], self.make_sweep, fp, reads)
                # the run goes on with the grid placed by the sweep (the workers get it too)
                self.cfg = c = c.model_copy(update={"grid": c.grid.resolve(self.swept()["b_budget"])})
            # traces are kept per grid run (see make_traces): a grid edit samples only the new runs
            upstream = fingerprint(fp, [TRACE_SEEDS, TRACE_RECORD])
            self.stage("traces", [], partial(self.make_traces, upstream), fp, [c.grid])
        fp = fingerprint(fp, [base_fp])
        students = self.run_students(fp)
        self.stage("report", [self.path("report")], self.make_report, fingerprint(fp, [*students, swept]), [c.grid])
        return self.path("report")

    @contextmanager
    def shared_engine(self) -> Iterator[None]:
        """The scope of the one offline engine the sweep and traces stages share (``engine``): started
        on first use, so a run whose sampling stages are done starts none; shut down before the
        students, which need the memory."""
        with ExitStack() as stack:
            self._engines = stack
            try:
                yield
            finally:
                self._engines, self._engine = None, None

    def engine(self) -> OfflineEngine:
        """The teacher in vLLM with the processor, the proxy and g (inside ``shared_engine``)."""
        if self._engine is not None:
            return self._engine
        if self._engines is None:
            raise RuntimeError("engine() is only available inside shared_engine()")
        grad = json.loads(self.path("gradient.json").read_text())
        s = self.cfg.sampling
        settings = (
            sampling.processor_settings(
                self.path("models", "proxy"),
                self.path("gradient.safetensors"),
                grad["epsilon"],
                self.largest_strength() / grad["scale"] + 1.0,
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
        teacher = self.path("models", "teacher")
        started = offline_engine(teacher, settings, seed=self.cfg.seed, engine_args=engine_args)
        self._engine = self._engines.enter_context(started)
        return self._engine

    def largest_strength(self) -> float:
        """The largest b any stage of this config can request (a budget fraction times at most the largest swept b)."""
        grid, sweep = self.cfg.grid, self.cfg.sweep
        values = [v for mode in ("antidistillation", "permutation") for v in getattr(grid, mode)]
        numbers = [float(v) for v in values if not isinstance(v, str)]
        fractions = [budget_fraction(v) or 0.0 for v in values if isinstance(v, str)]
        swept = max(sweep.values) * max([1.0, *fractions]) if sweep is not None else 0.0
        return max([0.0, swept, *numbers])

    def student_stage(self, point: Point, after: str, quiet: bool = False) -> str:
        """The attack on one grid run as a stage (fine-tune the student base on its traces, score it)."""
        name = run_name(*point)
        out = self.path("results", f"{name}.json")
        body = partial(self.distil, *point, out)
        return self.stage(f"student/{name}", [out], body, after, self.student_reads(point), quiet)

    def student_reads(self, point: Point) -> list[Any]:
        return [self.cfg.student.distill, self.cfg.mechanism, run_name(*point)]

    def student_fp(self, point: Point, after: str) -> str:
        return fingerprint(after, self.student_reads(point))

    def run_students(self, after: str) -> list[str]:
        """Every grid run's student stage. With ``workers`` > 1 the pending ones first run side by side
        in spawned processes (the students are independent: each reads only its traces and the base)."""
        points = self.cfg.grid.points()
        if self.cfg.workers == 1:
            return [self.student_stage(p, after) for p in points]
        pending = [p for p in points if not self.is_current(f"student/{run_name(*p)}", self.student_fp(p, after))]
        if pending:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(min(self.cfg.workers, len(pending)), mp_context=context) as pool:
                config = self.cfg.model_dump(mode="json")
                jobs = [pool.submit(_student_in_worker, config, str(self.root), p, after) for p in pending]
                for job in jobs:
                    self.executed.extend(job.result())
        return [self.student_stage(p, after, quiet=True) for p in points]

    def make_data(self) -> dict[str, Any]:
        t = self.cfg.task
        sizes = {s: getattr(t, s) for s in SPLITS}
        splits = make_splits(t.kind, t.params, sizes, self.cfg.seed)
        self.path("data").mkdir()
        for name, rows in splits.items():
            write_jsonl(self.path("data", f"{name}.jsonl"), rows)
        return {name: len(rows) for name, rows in splits.items()}

    def make_tokenizer(self) -> dict[str, Any]:
        if self.cfg.teacher.path is not None:
            tok = models.load_tokenizer(self.model_path(self.cfg.teacher))
        else:
            texts = [prompt_of(p) + p["solution"] for p in self.problems("train")]
            tok = models.train_tokenizer(texts, self.cfg.tokenizer_vocab)
        tok.save_pretrained(self.path("tokenizer"))
        return {"vocab": len(tok)}

    def model_path(self, spec: ModelSpec) -> Path:
        if spec.path in models.PRETRAINED:
            return models.PRETRAINED[spec.path](DEFAULT_CACHE)
        if spec.path == "teacher":
            return self.path("models", "teacher")
        return Path(str(spec.path))

    def build(self, spec: ModelSpec, tokenizer: Any) -> torch.nn.Module:
        if spec.shape is not None:
            return models.scratch_model(spec.shape, tokenizer, spec.seed).to(self.cfg.device)
        return self.load(self.model_path(spec), spec.layers)

    def load(self, path: Path, layers: int | None = None) -> torch.nn.Module:
        return models.load_model(path, layers).to(self.cfg.device)

    def train_model(self, role: str, spec: ModelSpec, train: Sequence[Problem] | None = None) -> dict[str, Any]:
        """Teacher and proxy: the run's tokenizer, trained on ``train`` (default: the train split's
        worked solutions)."""
        tok = models.load_tokenizer(self.path("tokenizer"))
        model = self.build(spec, tok)
        info: dict[str, Any] = {"parameters": models.parameter_count(model)}
        if spec.train is not None:
            train = self.problems("train") if train is None else train
            data = examples(tok, [prompt_of(p) for p in train], [p["solution"] for p in train])
            model, fit = fine_tune(model, data, spec.train, tok.pad_token_id, spec.seed, role)
            info.update(fit, train_problems=len(train))
        models.save(model, tok, self.path("models", role))
        test = self.problems("test")
        info["greedy_test_accuracy"] = scoring.model_accuracy(model, tok, test, self.cfg.answer_tokens)
        return info

    def proxy_reads(self, student_base_fp: str) -> list[Any]:
        """What the proxy stage depends on besides the teacher chain: its spec, and what its origin
        builds it from (the student's prior data, or the student base stage)."""
        origin = self.cfg.proxy.origin
        source = {"student_prior": self.cfg.student.pretrain_task, "student_base": student_base_fp}.get(origin)
        return [self.cfg.proxy, source]

    def make_proxy(self) -> dict[str, Any]:
        """The proxy by its origin (config.ProxySpec): trained on the student's prior data, the student
        base itself, or trained on the teacher's task."""
        origin = self.cfg.proxy.origin
        if origin == "student_base":
            shutil.copytree(self.path("models", "student_base"), self.path("models", "proxy"))
            return {"origin": origin, "parameters": models.parameter_count(self.load(self.path("models", "proxy")))}
        prior = self.student_prior() if origin == "student_prior" else None
        return {"origin": origin, **self.train_model("proxy", self.cfg.proxy, prior)}

    def student_prior(self) -> list[Problem]:
        """The student's prior training data (``student.pretrain_task``), never a test problem; the
        same problems for the student base and a ``student_prior`` proxy."""
        pre_task = self.cfg.student.pretrain_task
        if pre_task is None:
            return []
        pre = make_splits(pre_task.kind, pre_task.params, {"train": pre_task.train}, self.cfg.seed + 1)["train"]
        test = {p["question"] for p in self.problems("test")}
        return [p for p in pre if p["question"] not in test]

    def student_tokenizer(self) -> Any:
        spec = self.cfg.student
        if spec.path is None:
            return models.load_tokenizer(self.path("tokenizer"))
        return models.load_tokenizer(self.model_path(spec))

    def make_student_base(self) -> dict[str, Any]:
        spec = self.cfg.student
        tok = self.student_tokenizer()
        model = self.build(spec, tok)
        info: dict[str, Any] = {"parameters": models.parameter_count(model)}
        pre_task = spec.pretrain_task
        if spec.train is not None and pre_task is not None:
            pre = self.student_prior()
            write_jsonl(self.path("data", "student_pretrain.jsonl"), pre)
            data = examples(tok, [prompt_of(p) for p in pre], [p["solution"] for p in pre])
            model, fit = fine_tune(model, data, spec.train, tok.pad_token_id, spec.seed, "student pre-training")
            info.update(fit)
        models.save(model, tok, self.path("models", "student_base"))
        info["student_accuracy"] = scoring.model_accuracy(model, tok, self.problems("test"), self.cfg.answer_tokens)
        return info

    def make_holdout(self) -> dict[str, Any]:
        tok = self.tokenizer()
        teacher = self.load(self.path("models", "teacher"))
        problems = self.problems("holdout")
        prompts = [prompt_of(p) for p in problems]
        s = self.cfg.sampling
        torch.manual_seed(self.cfg.seed)
        texts = scoring.sampled_completions(teacher, tok, prompts, s.max_tokens, s.holdout_temperature, s.top_p)
        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, texts, strict=True)]
        write_jsonl(self.path("holdout.jsonl"), rows)
        return {"traces": len(texts), "accuracy": scoring.accuracy(texts, problems)}

    def make_gradient(self) -> dict[str, Any]:
        from antidistill.benchmarks.distillation.proxy_gradient import gradient_and_scale

        info = gradient_and_scale(
            self.path("models", "proxy"),
            self.path("holdout.jsonl"),
            self.path("gradient.safetensors"),
            self.cfg.sampling.epsilons,
        )
        self.path("gradient.json").write_text(json.dumps(info, indent=2))
        return {k: info[k] for k in ("epsilon", "scale", "mean_loss", "traces", "trace_tokens")}

    def make_sweep(self) -> dict[str, Any]:
        """Teacher accuracy against b on the first ``sweep.problems`` distill prompts (SweepSpec), and
        the budget's b: the largest swept value within ``sweep.budget`` of the λ = 0 accuracy."""
        sweep, s = self.cfg.sweep, self.cfg.sampling
        assert sweep is not None
        scale = json.loads(self.path("gradient.json").read_text())["scale"]
        problems = self.problems("distill")[: sweep.problems]
        tok = self.tokenizer()
        prompts = [tok(prompt_of(p))["input_ids"] for p in problems]
        values = [0.0, *sweep.values]
        requests = [
            TraceRequest(ids, s.temperature, b / scale, "ad", request_seed(self.cfg.seed, 0, "sweep", i))
            for b in values
            for i, ids in enumerate(prompts)
        ]
        texts = [c.text for c in self.engine().generate(requests, top_p=s.top_p, max_tokens=s.max_tokens)]
        n = len(problems)
        accuracy = [scoring.accuracy(texts[k * n : (k + 1) * n], problems) for k in range(len(values))]
        b_budget = budget_strength(sweep.values, accuracy[1:], accuracy[0], sweep.budget)
        result = {
            "temperature": s.temperature,
            "problems": n,
            "budget": sweep.budget,
            "scale": scale,
            "points": [
                {"b": b, "lambda": b / scale, "teacher_accuracy": a} for b, a in zip(values, accuracy, strict=True)
            ],
            "b_budget": b_budget,
            "bracketed": b_budget < sweep.values[-1],
        }
        self.path("sweep.json").write_text(json.dumps(result, indent=2))
        if b_budget == 0:
            raise SweepFailed(
                f"sweep: the smallest b ({sweep.values[0]:g}) already costs the teacher "
                f"{100 * (accuracy[0] - accuracy[1]):.1f} points (budget {100 * sweep.budget:g}): "
                "add smaller values to sweep.values"
            )
        if not result["bracketed"]:
            log.warning("sweep: every value is within the budget; add larger values to find its edge")
        return {"b_budget": b_budget, "base_accuracy": accuracy[0], "bracketed": result["bracketed"]}

    def swept(self) -> dict[str, Any]:
        return json.loads(self.path("sweep.json").read_text())

    def grid_requests(
        self, tok: Any, scale: float, points: Sequence[Point]
    ) -> tuple[list[TraceRequest], list[tuple[str, str, int]]]:
        """The grid runs' distill and test prompts as requests, with (run, split, index) labels. Each
        request has a seed of its own (``request_seed``), so that a rerun samples the same traces
        (vLLM's engine-wide seed alone depends on how requests are batched)."""
        s = self.cfg.sampling
        requests, labels = [], []
        prompts = {
            split: [tok(prompt_of(p))["input_ids"] for p in self.problems(split)] for split in ("distill", "test")
        }
        for mode, value, seed in points:
            if mode == "temperature":
                tau, lam, ad_mode = value, 0.0, "ad"
            else:
                tau, lam, ad_mode = s.temperature, value / scale, "ad" if mode == "antidistillation" else "permutation"
            for split, ids_list in prompts.items():
                for i, ids in enumerate(ids_list):
                    label = (run_name(mode, value, seed), split, i)
                    requests.append(TraceRequest(ids, tau, lam, ad_mode, request_seed(self.cfg.seed, seed, split, i)))
                    labels.append(label)
        return requests, labels

    def make_traces(self, upstream: str) -> dict[str, Any]:
        """Traces for every grid run that lacks them. Runs already sampled are kept while what they
        were sampled from (teacher, proxy, gradient, sampling settings: the ``upstream`` fingerprint)
        is unchanged, since each request's own seed makes a run's traces the same whichever runs share
        the engine: a new point or seed costs only its own requests."""
        traces = self.path("traces")
        stamp = traces / "upstream.txt"
        if traces.is_dir() and not (stamp.is_file() and stamp.read_text() == upstream):
            shutil.rmtree(traces)
        traces.mkdir(exist_ok=True)
        stamp.write_text(upstream)
        points = self.cfg.grid.points()
        # a run's .json is written after its .jsonl: it marks the run complete
        missing = [p for p in points if not (traces / f"{run_name(*p)}.json").is_file()]
        if not missing:
            return {"runs": 0, "requests": 0, "kept": len(points)}
        grad = json.loads(self.path("gradient.json").read_text())
        tok = self.tokenizer()
        requests, labels = self.grid_requests(tok, grad["scale"], missing)
        s = self.cfg.sampling
        engine = self.engine()
        completions = engine.generate(requests, top_p=s.top_p, max_tokens=s.max_tokens)
        scored = [j for j, (_, split, _) in enumerate(labels) if split == "distill"]  # what students see
        logprobs = engine.token_logprobs(
            [requests[j].prompt_ids for j in scored], [completions[j].token_ids for j in scored]
        )
        scores = dict(zip(scored, logprobs, strict=True))
        problems = {split: self.problems(split) for split in ("distill", "test")}
        by_run: dict[str, dict[str, list]] = {}
        for j, ((run, split, i), req, done) in enumerate(zip(labels, requests, completions, strict=True)):
            parts = by_run.setdefault(run, {"distill": [], "test": [], "request": req, "scored": []})
            parts[split].append((i, done.text))
            if split == "distill":
                parts["scored"].append(j)
        for run, parts in by_run.items():
            rows = [
                {
                    "prompt": prompt_of(problems["distill"][i]),
                    "completion": t,
                    "answer": problems["distill"][i]["answer"],
                }
                for i, t in parts["distill"]
            ]
            write_jsonl(self.path("traces", f"{run}.jsonl"), rows)
            req = parts["request"]
            meta = {
                "temperature": req.temperature,
                "lambda": req.lam,
                "ad_mode": req.mode,
                "teacher_accuracy": scoring.accuracy([t for _, t in parts["test"]], problems["test"]),
                "trace_accuracy": scoring.accuracy([r["completion"] for r in rows], problems["distill"]),
                "mean_trace_chars": sum(len(r["completion"]) for r in rows) / len(rows),
                "quality": trace_quality(
                    [completions[j].token_ids for j in parts["scored"]],
                    [scores[j] for j in parts["scored"]],
                    [extract_answer(completions[j].text) is not None for j in parts["scored"]],
                ).as_dict(),
                "samples": [r["completion"] for r in rows[:SAMPLE_TRACES]],
            }
            self.path("traces", f"{run}.json").write_text(json.dumps(meta))
        return {"runs": len(by_run), "requests": len(requests), "kept": len(points) - len(missing)}

    def distil(self, mode: str, value: float, seed: int, out: Path) -> dict[str, Any]:
        """The attack for one grid run: fine-tune the student base on that run's traces, score it."""
        name = run_name(mode, value, seed)
        meta = json.loads(self.path("traces", f"{name}.json").read_text())
        rows = read_jsonl(self.path("traces", f"{name}.jsonl"))
        tok = self.student_tokenizer()
        student = self.load(self.path("models", "student_base"))
        data = examples(tok, [r["prompt"] for r in rows], [r["completion"] for r in rows])
        spec, check = self.cfg.student, self.cfg.mechanism
        train_seed = spec.seed + 7919 * seed
        monitor = self.heldout_monitor(tok)
        student, fit = fine_tune(
            student, data, spec.distill, tok.pad_token_id, train_seed, name, monitor, check.checkpoints
        )
        acc = scoring.model_accuracy(student, tok, self.problems("test"), self.cfg.answer_tokens)
        mechanism = {"student": fit.get("curve")}
        if monitor is not None and check.proxy:
            mechanism["proxy"] = self.proxy_after_distillation(rows, train_seed, name)
        result = {
            "config": self.cfg.name,
            "mode": mode,
            "value": value,
            "seed": seed,
            **meta,
            "student_accuracy": acc,
            "n_test": len(self.problems("test")),
            "n_traces": len(rows),
            "train_loss": fit["final_loss"],
            "mechanism": mechanism,
        }
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result))
        return {"student_accuracy": acc, "teacher_accuracy": meta["teacher_accuracy"]}

    def heldout_monitor(self, tok: Any) -> Callable[[torch.nn.Module], float] | None:
        """The NLL of the first ``mechanism.heldout_traces`` clean holdout traces (λ = 0 teacher
        traces no student or point trains on) under a model with tokenizer ``tok``; None when off."""
        count = self.cfg.mechanism.heldout_traces
        if count == 0:
            return None
        rows = read_jsonl(self.path("holdout.jsonl"))[:count]
        heldout = examples(tok, [r["prompt"] for r in rows], [r["completion"] for r in rows])
        return partial(completion_nll, examples=heldout, pad_id=tok.pad_token_id)

    def proxy_after_distillation(self, rows: Sequence[dict[str, Any]], seed: int, name: str) -> Any:
        """A copy of the proxy fine-tuned like the student on a point's traces: its held-out NLL curve
        (does what g predicts — the proxy's held-out loss rises — happen to the proxy itself?)."""
        tok = self.tokenizer()
        proxy = self.load(self.path("models", "proxy"))
        data = examples(tok, [r["prompt"] for r in rows], [r["completion"] for r in rows])
        spec = self.cfg.student.distill
        monitor = self.heldout_monitor(tok)
        _, fit = fine_tune(
            proxy, data, spec, tok.pad_token_id, seed, f"{name} (proxy)", monitor, self.cfg.mechanism.checkpoints
        )
        return fit["curve"]

    def make_report(self) -> dict[str, Any]:
        results = [json.loads(self.path("results", f"{run_name(*p)}.json").read_text()) for p in self.cfg.grid.points()]
        base = json.loads(self.sentinel("student_base").read_text())
        report = self.path("report")
        report.mkdir()
        write_jsonl(report / "registry.jsonl", results)
        names = ["data", "tokenizer", "teacher", "proxy", "holdout", "gradient", "traces", "student_base"]
        names += ["sweep"] if self.cfg.sweep is not None else []
        names += [f"student/{run_name(*p)}" for p in self.cfg.grid.points()]
        sentinels = {name: json.loads(self.sentinel(name).read_text()) for name in names}
        timings = {name: s["seconds"] for name, s in sentinels.items()}
        students = [s for n, s in sentinels.items() if n.startswith("student/")]
        # sentinels written before "finished" was recorded count as having run one after another
        spans = [(s["finished"] - s["seconds"], s["finished"]) for s in students if "finished" in s]
        wall = summary.busy_seconds(spans)
        wall += sum(s["seconds"] for s in students if "finished" not in s)
        gradient = sentinels["gradient"]
        holdout = (gradient.get("traces"), gradient.get("trace_tokens"))
        traces = {
            p: json.loads(self.path("traces", f"{run_name(*p)}.json").read_text()) for p in self.cfg.grid.points()
        }
        quality = summary.trace_quality_by_point(traces)
        swept = self.swept() if self.cfg.sweep is not None else None
        verdict = summary.write_report(
            self.cfg, results, base["student_accuracy"], timings, wall, report, holdout, quality, swept
        )
        return {"target_met": verdict["target_met"]}


def _student_in_worker(config: dict[str, Any], root: str, point: Point, after: str) -> list[str]:
    """One student stage in a worker process (spawned: a fresh interpreter, so set up logging and threads)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    pipe = Pipeline(EvalConfig.model_validate(config), Path(root))
    if pipe.cfg.threads:
        torch.set_num_threads(pipe.cfg.threads)
    pipe.student_stage(point, after)
    return pipe.executed
