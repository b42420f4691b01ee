"""The ``gradient`` stage: g on the holdout traces (the production gradient tool's functions), then
ε calibrated against the exact JVP and the Δ scale that turns grid strengths b into λ = b / scale."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from proxy_worker.calibrate import calibrate, delta_scale, exact_reference, recommend
from proxy_worker.config import load_config
from proxy_worker.gradient import WEIGHTING, compute_gradient, tokenize_all
from proxy_worker.gradient_file import CONFIG_HASH_KEY, save_gradient
from proxy_worker.plan import build_plan
from proxy_worker.traces import read_traces
from proxy_worker.weights import load_proxy_state

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
