"""One evaluation run directory and the config it runs with: where each stage's outputs, the stage
records and the models lie, and how they are read back. The pipeline (which stages run) and the
stage bodies (what each runs) both work through it, so neither needs the other's module."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from antidistill.benchmarks.distillation import models
from antidistill.benchmarks.distillation.config import EvalConfig, ModelSpec, point_name
from antidistill.benchmarks.distillation.tasks import Problem
from antidistill.server.embedded.model import DEFAULT_CACHE

Point = tuple[str, float, int]  # (mode, value, seed) of one grid run


def run_name(mode: str, value: float, seed: int) -> str:
    """A grid run's name in file and stage names: ``<mode>@<value>#<seed>``."""
    return f"{point_name(mode, value)}#{seed}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class RunDir:
    """One run directory: ``stages/*.done`` records, data, models, traces, results, report."""

    def __init__(self, cfg: EvalConfig, root: Path) -> None:
        self.cfg = cfg
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def sentinel(self, stage: str) -> Path:
        """Where the record of a finished stage lies (written last, so it marks the stage done)."""
        return self.path("stages", stage.replace("/", "_") + ".done")

    def record(self, stage: str) -> dict[str, Any]:
        """A finished stage's record: what its body returned, its seconds and fingerprint."""
        return json.loads(self.sentinel(stage).read_text())

    def problems(self, split: str) -> list[Problem]:
        return read_jsonl(self.path("data", f"{split}.jsonl"))

    def swept(self) -> dict[str, Any]:
        """The sweep stage's result (sweep.json)."""
        return json.loads(self.path("sweep.json").read_text())

    def tokenizer(self) -> Any:
        """The teacher's tokenizer (the proxy shares it)."""
        return models.load_tokenizer(self.path("models", "teacher"))

    def student_tokenizer(self) -> Any:
        spec = self.cfg.student
        if spec.path is None:
            return models.load_tokenizer(self.path("tokenizer"))
        return models.load_tokenizer(self.model_path(spec))

    def model_path(self, spec: ModelSpec) -> Path:
        """Where a model spec's checkpoint lies: a packaged pretrained one, this run's teacher, or a path."""
        if spec.path in models.PRETRAINED:
            return models.PRETRAINED[spec.path](DEFAULT_CACHE)
        if spec.path == "teacher":
            return self.path("models", "teacher")
        return Path(str(spec.path))

    def load(self, path: Path, layers: int | None = None) -> torch.nn.Module:
        return models.load_model(path, layers).to(self.cfg.device)
