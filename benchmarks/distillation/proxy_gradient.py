"""The ``gradient`` stage: g on the holdout traces (the production gradient tool's functions), then
ε calibrated against the exact JVP and the Δ scale that turns grid strengths b into λ = b / scale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.gradient_file import CONFIG_HASH_KEY, save_gradient
from antidistill.proxy_worker.core.plan import build_plan
from antidistill.proxy_worker.core.weights import load_proxy_state
from antidistill.proxy_worker.tools.calibrate import calibrate, delta_scale, exact_reference, recommend
from antidistill.proxy_worker.tools.gradient import WEIGHTING, compute_gradient, tokenize_all
from antidistill.proxy_worker.tools.traces import read_traces

CALIBRATION_TRACES = 8


def gradient_and_scale(proxy: Path, holdout: Path, out: Path, epsilons: Sequence[float]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    cfg = load_config(proxy)
    theta = load_proxy_state(proxy, cfg)
    traces = tokenize_all(AutoTokenizer.from_pretrained(proxy), read_traces(holdout), max_tokens=4096)
    grad, loss = compute_gradient(cfg, theta, traces)
    save_gradient(out, grad, {CONFIG_HASH_KEY: cfg.digest, "mean_loss": f"{loss:.6f}", "weighting": WEIGHTING})
    sample = [t.ids for t in traces[:CALIBRATION_TRACES]]
    plan = build_plan(sample, [0] * len(sample))
    exact = exact_reference(cfg, theta, grad, plan)
    points = calibrate(cfg, theta, grad, plan, list(epsilons), ["float32"], exact)
    best = recommend(points)["float32"]
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grad.values())))
    return {
        "epsilon": best.epsilon,
        "scale": delta_scale(exact),
        "mean_loss": loss,
        "grad_norm": norm,
        "traces": len(traces),
        "calibration": [asdict(p) for p in points],
    }
