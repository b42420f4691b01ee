"""An evaluation config (YAML): the task, the three models, how traces are sampled, and the grid.

Grid strengths are given as b = λ·s, where s is the proxy's Δ scale (the mean per-token standard
deviation of Δ over the vocabulary, measured on the holdout traces in the ``gradient`` stage): b = 1
moves logits by about one standard deviation whatever the proxy or gradient, so one grid serves
retrained models. The registry records both b and the λ actually sent.

An AD or permutation value may also be written relative to the teacher budget: ``budget`` or
``0.5*budget`` is that fraction of the largest b whose teacher-accuracy loss stays within the
budget, as measured by the ``sweep`` stage before any trace is sampled, so the key points land
inside the budget by construction rather than by a guess made for another proxy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from antidistill.benchmarks.distillation.models import Shape
from antidistill.benchmarks.distillation.training import TrainSpec
from antidistill.proxy_worker.runtime.settings import one_line
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"
MODES = ("temperature", "antidistillation", "permutation")
Mode = Literal["temperature", "antidistillation", "permutation"]
TEACHER_LOSS_ALLOWED = 0.02  # the target's teacher budget: accuracy lost against plain sampling
BUDGET_VALUE = re.compile(r"^(?:(\d+(?:\.\d*)?|\.\d+)\*)?budget$")
Strength = float | str  # a b value, or a fraction of the swept budget ("budget", "0.5*budget")


class ConfigError(ValueError):
    """The evaluation config cannot be used; the message names the file and field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSpec(Strict):
    kind: str = Field(description="chain_sum, gsm_symbolic or jsonl (see tasks.py)")
    params: dict[str, Any] = Field(default_factory=dict, description="passed to the generator")
    train: int = Field(0, description="problems with worked solutions, for teacher and proxy training")
    holdout: int = Field(0, description="prompts whose teacher traces define the proxy's loss (gradient)")
    distill: int = Field(0, description="prompts whose teacher traces the attacker trains on")
    test: int = Field(0, description="held-out problems scored for teacher and student accuracy")


class ModelSpec(Strict):
    """A model trained from scratch (``shape``) or loaded (``path``: a checkpoint directory or hub id, ``teacher``
    for the run's trained teacher, or a packaged one: ``smollm2`` = the embedded SmolLM2-135M-Instruct,
    ``gemma3-270m`` = the base Gemma-3-270M, models.PRETRAINED)."""

    shape: Shape | None = None
    path: str | None = None
    layers: int | None = Field(None, gt=0, description="keep only the first N decoder layers of ``path``")
    train: TrainSpec | None = Field(None, description="supervised training on worked solutions")
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.shape is None) == (self.path is None):
            raise ValueError("give exactly one of shape (train from scratch) or path (load)")
        if self.shape is not None and self.train is None:
            raise ValueError("a model built from scratch needs train")
        return self


ProxyOrigin = Literal["student_prior", "student_base", "teacher_task"]


class ProxySpec(ModelSpec):
    """The proxy stands where the student stands before distillation: its gradient must say how a
    fresh student would learn from the traces, not encode a teacher-like model's leftover errors."""

    origin: ProxyOrigin = Field(
        "student_prior",
        description="student_prior: this shape/path trained (``train``) only on the student's prior data "
        "(student.pretrain_task; a pretrained path without ``train`` is used as it is) — the default; "
        "student_base: the student base itself, before distillation (the oracle; shape, path and train "
        "must be left out); teacher_task: trained on the teacher's own task (the train split)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ProxySpec:
        if self.origin == "student_base":
            if self.shape is not None or self.path is not None or self.train is not None or self.layers:
                raise ValueError("origin student_base is the student base itself: give no shape, path, layers or train")
            return self
        return ModelSpec._one_source(self)


class StudentSpec(ModelSpec):
    pretrain_task: TaskSpec | None = Field(None, description="the student's own prior training data")
    distill: TrainSpec = Field(description="the attack: fine-tuning on teacher traces")


class SamplingSpec(Strict):
    temperature: float = Field(0.8, ge=0, description="τ of the antidistillation and permutation points")
    top_p: float = Field(1.0, gt=0, le=1)
    holdout_temperature: float = Field(
        0.0, ge=0, description="τ of the holdout traces that define g (0: greedy, as the official code samples them)"
    )
    max_tokens: int = Field(64, gt=0)
    epsilons: list[float] = Field([1e-2, 1e-3, 1e-4], min_length=1, description="candidates; calibrated")
    dtype: str = "float32"
    enforce_eager: bool = True
    max_model_len: int = 256
    max_num_seqs: int = 64
    kv_cache_gib: int = Field(1, description="VLLM_CPU_KVCACHE_SPACE on CPU (ignored on GPUs)")
    proxy_token_budget: int = 8192
    engine_args: dict[str, Any] = Field(default_factory=dict, description="more vllm.LLM arguments (e.g. TP)")
    processor: dict[str, Any] = Field(default_factory=dict, description="more processor settings (proxy_dtype…)")


def budget_fraction(value: Strength) -> float | None:
    """The fraction of the swept budget a grid value names (``0.5*budget`` → 0.5); None for a b value."""
    if not isinstance(value, str):
        return None
    match = BUDGET_VALUE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is neither a number nor 'budget' / '<fraction>*budget'")
    return float(match.group(1) or 1.0)


def resolved_strength(value: Strength, b_budget: float) -> float:
    """A grid value as b: a budget fraction times ``b_budget``, rounded to 3 significant digits so
    the point's name stays readable (``antidistillation@0.0375``)."""
    fraction = budget_fraction(value)
    return float(value) if fraction is None else float(f"{fraction * b_budget:.3g}")


class SweepSpec(Strict):
    """Teacher accuracy against b, measured before the grid is sampled: ``values`` (ascending b) at
    sampling.temperature on the first ``problems`` distill prompts, every value on the same random
    stream (common random numbers), against the same prompts sampled with λ = 0. The budget's b is
    the largest value whose loss, and every smaller value's, stays within ``budget``."""

    values: list[float] = Field(min_length=1, description="candidate b values, ascending, > 0")
    problems: int = Field(1024, gt=0, description="distill prompts sampled per value (not the test split)")
    budget: float = Field(TEACHER_LOSS_ALLOWED, gt=0, lt=1, description="teacher accuracy (fraction) allowed lost")

    @model_validator(mode="after")
    def _ascending(self) -> SweepSpec:
        if self.values[0] <= 0 or any(b <= a for a, b in zip(self.values, self.values[1:], strict=False)):
            raise ValueError("sweep.values must be positive and strictly ascending")
        return self


class GridSpec(Strict):
    temperature: list[float] = Field(description="τ values sampled with λ = 0")
    antidistillation: list[Strength] = Field(
        description="b = λ·scale values at sampling.temperature, or budget fractions ('budget', '0.5*budget')"
    )
    permutation: list[Strength] = Field(description="b values (or budget fractions) of the permutation control")
    seeds: int = Field(1, ge=1, description="replicates of every point")
    key_points: list[str] = Field(default_factory=list, description="'mode@value' points with key_seeds")
    key_seeds: int = Field(3, ge=1)
    verdict_point: str | None = Field(
        None,
        description="the AD key point the verdict is read at ('antidistillation@budget'), named before the run: "
        "picking the best of several points after seeing them would read the luckiest one (None: no verdict)",
    )

    @property
    def needs_sweep(self) -> bool:
        return any(isinstance(v, str) for mode in MODES for v in getattr(self, mode))

    def resolve(self, b_budget: float) -> GridSpec:
        """This grid with budget fractions replaced by b values (duplicates merged, key points renamed)."""
        update: dict[str, Any] = {}
        renamed: dict[str, str] = {}
        for mode in ("antidistillation", "permutation"):
            values = getattr(self, mode)
            resolved = [resolved_strength(v, b_budget) for v in values]
            renamed |= {point_name(mode, v): point_name(mode, r) for v, r in zip(values, resolved, strict=True)}
            update[mode] = list(dict.fromkeys(resolved))
        update["key_points"] = list(dict.fromkeys(renamed.get(k, k) for k in self.key_points))
        if self.verdict_point is not None:
            update["verdict_point"] = renamed.get(self.verdict_point, self.verdict_point)
        return self.model_copy(update=update)

    def points(self) -> list[tuple[Mode, float, int]]:
        """(mode, value, seed) for every run, in a stable order (of a resolved grid: see ``resolve``)."""
        if self.needs_sweep:
            raise ValueError("the grid names budget fractions: resolve it with the sweep's b first")
        out: list[tuple[Mode, float, int]] = []
        for mode in MODES:
            for value in getattr(self, mode):
                seeds = self.key_seeds if point_name(mode, value) in self.key_points else self.seeds
                out.extend((mode, value, s) for s in range(max(seeds, self.seeds)))
        return out

    @model_validator(mode="after")
    def _keys_exist(self) -> GridSpec:
        for mode in ("antidistillation", "permutation"):
            for value in getattr(self, mode):
                budget_fraction(value)  # a bad string is named here, at load time
        names = {point_name(m, v) for m in MODES for v in getattr(self, m)}
        missing = [k for k in self.key_points if k not in names]
        if missing:
            raise ValueError(f"key point {missing[0]!r} is not on the grid ({', '.join(sorted(names))})")
        verdict = self.verdict_point
        if verdict is not None and (not verdict.startswith("antidistillation@") or verdict not in self.key_points):
            raise ValueError(f"verdict_point {verdict!r} must be an antidistillation point among key_points")
        return self


class MechanismSpec(Strict):
    """The paper's mechanism check: does training on a point's traces lower the student's training
    loss while its NLL on clean held-out teacher traces rises? And the proxy's, after the same
    fine-tuning? Where the chain breaks when the target is missed."""

    heldout_traces: int = Field(128, ge=0, description="clean (λ = 0) holdout teacher traces scored (0: off)")
    checkpoints: int = Field(5, gt=0, description="points along each fine-tuning at which they are scored")
    proxy: bool = Field(True, description="also fine-tune a copy of the proxy on each point's traces")


class EvalConfig(Strict):
    name: str
    seed: int = 0
    threads: int | None = Field(None, gt=0, description="torch threads (default: torch's choice)")
    workers: int = Field(
        1, ge=1, description="students fine-tuned side by side in this many processes, each with `threads` threads"
    )
    device: str = Field("cpu", description="where HF training and scoring run: cpu or cuda")
    task: TaskSpec
    tokenizer_vocab: int = Field(320, description="BPE size when the teacher is trained from scratch")
    teacher: ModelSpec
    proxy: ProxySpec
    student: StudentSpec
    answer_tokens: int = Field(64, description="greedy tokens when scoring the student")
    sampling: SamplingSpec = SamplingSpec()
    mechanism: MechanismSpec = MechanismSpec()
    sweep: SweepSpec | None = Field(None, description="teacher accuracy vs b before the grid (see SweepSpec)")
    grid: GridSpec

    @model_validator(mode="after")
    def _proxy_can_be_built(self) -> EvalConfig:
        proxy, student = self.proxy, self.student
        if proxy.origin == "student_prior" and proxy.train is not None and student.pretrain_task is None:
            raise ValueError("proxy.origin student_prior trains on student.pretrain_task, which is not set")
        if proxy.origin == "student_base" and student.path is not None and self.teacher.path != student.path:
            raise ValueError("proxy.origin student_base needs a student that shares the teacher's tokenizer")
        if self.grid.needs_sweep and self.sweep is None:
            raise ValueError("the grid names budget fractions ('budget', '<f>*budget'): add a sweep section")
        if self.sweep is not None and self.sweep.problems > self.task.distill:
            raise ValueError(f"sweep.problems ({self.sweep.problems}) exceeds task.distill ({self.task.distill})")
        return self


def point_name(mode: str, value: Strength) -> str:
    return f"{mode}@{value}" if isinstance(value, str) else f"{mode}@{value:g}"


def resolve(name_or_path: str) -> Path:
    """``toy`` → the packaged configs/toy.yaml; anything else is a path."""
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    path = packaged if packaged.is_file() else Path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"{name_or_path}: no such config (packaged: {known})")
    return path


def load_eval_config(name_or_path: str) -> EvalConfig:
    path = resolve(name_or_path)
    try:
        return EvalConfig.model_validate(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from None
    except ValidationError as exc:
        raise ConfigError(f"{path}: {one_line(exc)}") from None
