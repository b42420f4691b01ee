"""The resumable evaluation: which stages run, in what order, and the record each leaves. Every
stage writes its outputs, then a sentinel holding the stage's fingerprint — a hash of the config
sections it reads, chained with the fingerprint of the stage before it. A rerun skips stages whose
sentinel matches, so a killed run redoes only the stage it was killed in (and those after it), and a
config edit redoes only the stages it affects: a new grid reuses the trained teacher, proxy and
gradient, and the traces and students of the runs it keeps.

    data → tokenizer → teacher → student_base → proxy → holdout → gradient → [sweep] → traces
         → student/<mode>@<value>#<seed> (one per grid run) → report

The proxy comes after the student base because it stands where the student stands before
distillation (``proxy.origin``): trained on the student's prior data, or the student base itself.

What each stage runs lives beside this module: prepare.py (data to gradient; ``holdout`` samples the
teacher with plain sampling through HF, no processor involved), sampling.py (``sweep`` and
``traces``, through the vLLM processor we serve with, in one engine), students.py (the students,
independent of each other: with ``workers`` > 1 they run side by side in processes) and report.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from antidistill.benchmarks.distillation import prepare, report, sampling, students
from antidistill.benchmarks.distillation.config import EvalConfig
from antidistill.benchmarks.distillation.run_dir import Point, RunDir, run_name
from antidistill.proxy_worker.runtime.offline import OfflineEngine
from pydantic import BaseModel

log = logging.getLogger("antidistill.eval")


class RunDirBusy(RuntimeError):
    """Another process is running a pipeline in the same directory."""


def fingerprint(after: str, reads: Sequence[Any]) -> str:
    """Hash of the previous stage's fingerprint and the config values a stage reads."""
    parts = [r.model_dump(mode="json") if isinstance(r, BaseModel) else r for r in reads]
    return hashlib.sha256(json.dumps([after, parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


class Pipeline(RunDir):
    """The stages of one run directory, each run unless its record is current; ``executed`` names
    the stages this object ran (in a worker process too)."""

    def __init__(self, cfg: EvalConfig, root: Path) -> None:
        super().__init__(cfg, root)
        self.executed: list[str] = []
        self._engines: ExitStack | None = None
        self._engine: OfflineEngine | None = None

    # --- stage records -----------------------------------------------------------------------
    def is_current(self, name: str, fp: str) -> bool:
        return self.sentinel(name).is_file() and self.record(name).get("fingerprint") == fp

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

    # --- the chain of stages ------------------------------------------------------------------
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
        fp = self.stage("data", [self.path("data")], partial(prepare.make_data, self), "", [c.seed, c.task])
        tok_body = partial(prepare.make_tokenizer, self)
        tok = self.stage("tokenizer", [self.path("tokenizer")], tok_body, fp, [c.tokenizer_vocab, c.teacher])
        teacher = partial(prepare.train_model, self, "teacher", c.teacher)
        fp = self.stage("teacher", [self.path("models", "teacher")], teacher, tok, [c.answer_tokens])
        # the student's prior training does not depend on the teacher: it is chained to the tokenizer only
        base = [self.path("models", "student_base"), self.path("data", "student_pretrain.jsonl")]
        student = c.student.model_dump(exclude={"distill"})
        base_body = partial(prepare.make_student_base, self)
        base_fp = self.stage("student_base", base, base_body, tok, [student, c.answer_tokens])
        proxy = partial(prepare.make_proxy, self)
        fp = self.stage("proxy", [self.path("models", "proxy")], proxy, fp, self.proxy_reads(base_fp))
        holdout = partial(prepare.make_holdout, self)
        fp = self.stage("holdout", [self.path("holdout.jsonl")], holdout, fp, [c.sampling, c.task.holdout])
        gradient = [self.path("gradient.safetensors"), self.path("gradient.json")]
        fp = self.stage("gradient", gradient, partial(prepare.make_gradient, self), fp, [])
        with self.shared_engine():
            swept = ""
            if c.sweep is not None:
                reads = [c.sweep, c.sampling, sampling.TRACE_SEEDS]
                sweep = partial(sampling.make_sweep, self, self.engine)
                swept = self.stage("sweep", [self.path("sweep.json")], sweep, fp, reads)
                # the run goes on with the grid placed by the sweep (the workers get it too)
                self.cfg = c = c.model_copy(update={"grid": c.grid.resolve(self.swept()["b_budget"])})
            # traces are kept per grid run (see sampling.make_traces): a grid edit samples only the new runs
            upstream = fingerprint(fp, [sampling.TRACE_SEEDS, sampling.TRACE_RECORD])
            self.stage("traces", [], partial(sampling.make_traces, self, self.engine, upstream), fp, [c.grid])
        fp = fingerprint(fp, [base_fp])
        done = self.run_students(fp)
        reported = fingerprint(fp, [*done, swept])
        self.stage("report", [self.path("report")], partial(report.make_report, self), reported, [c.grid])
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
        self._engine = self._engines.enter_context(sampling.teacher_engine(self))
        return self._engine

    def student_stage(self, point: Point, after: str, quiet: bool = False) -> str:
        """The attack on one grid run as a stage (fine-tune the student base on its traces, score it)."""
        name = run_name(*point)
        out = self.path("results", f"{name}.json")
        body = partial(students.distil, self, *point, out)
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

    def proxy_reads(self, student_base_fp: str) -> list[Any]:
        """What the proxy stage depends on besides the teacher chain: its spec, and what its origin
        builds it from (the student's prior data, or the student base stage)."""
        origin = self.cfg.proxy.origin
        source = {"student_prior": self.cfg.student.pretrain_task, "student_base": student_base_fp}.get(origin)
        return [self.cfg.proxy, source]


def _student_in_worker(config: dict[str, Any], root: str, point: Point, after: str) -> list[str]:
    """One student stage in a worker process (spawned: a fresh interpreter, so set up logging and threads)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    pipe = Pipeline(EvalConfig.model_validate(config), Path(root))
    if pipe.cfg.threads:
        torch.set_num_threads(pipe.cfg.threads)
    pipe.student_stage(point, after)
    return pipe.executed
