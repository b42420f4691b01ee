"""The ``gradient`` stage: g on the holdout traces (the production gradient tool's functions), then
ε calibrated against the exact JVP; the Δ scale that turns grid strengths b into λ = b / scale is the
one the gradient file stores (core/strength.py), as a server's ``strength:`` tiers use it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.gradient_file import DELTA_SCALE_KEY
from antidistill.proxy_worker.core.plan import build_plan
from antidistill.proxy_worker.tools.calibrate import calibrate, exact_reference, recommend
from antidistill.proxy_worker.tools.gradient import build_gradient_file

CALIBRATION_TRACES = 8


def gradient_and_scale(proxy: Path, holdout: Path, out: Path, epsilons: Sequence[float]) -> dict[str, Any]:
    built = build_gradient_file(proxy, holdout, out)
    cfg = load_config(proxy)
    sample = [t.ids for t in built.traces[:CALIBRATION_TRACES]]
    plan = build_plan(sample, [0] * len(sample))
    exact = exact_reference(cfg, built.theta, built.grad, plan)
    points = calibrate(cfg, built.theta, built.grad, plan, list(epsilons), ["float32"], exact)
    best = recommend(points)["float32"]
    return {
        "epsilon": best.epsilon,
        "scale": float(built.metadata[DELTA_SCALE_KEY]),
        "mean_loss": built.mean_loss,
        "grad_norm": built.norm,
        "traces": len(built.traces),
        "trace_tokens": sum(t.completion_tokens for t in built.traces),
        "calibration": [asdict(p) for p in points],
    }
