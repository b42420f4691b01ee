"""Statistics over a registry of grid runs (one row per mode, value and seed): per-point means with
95% intervals, differences between points, paired gaps per seed, and the per-point means of the
fine-tuning curves and trace quality. Intervals: over seeds, a 95% Student-t interval of the mean;
a single-seed point gets the 95% Wilson interval of its test accuracy instead."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from antidistill.benchmarks.distillation.config import point_name

# two-sided 95% Student-t quantiles by degrees of freedom (more seeds: normal approximation)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
QUALITY_FIGURES = ("teacher_nll", "degenerate_rate", "mean_tokens")


@dataclass(frozen=True)
class PointStat:
    mode: str
    value: float
    seeds: int
    teacher: float
    teacher_ci: float
    student: float
    student_ci: float


def wilson_half_width(p: float, n: int, z: float = 1.96) -> float:
    centre_spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre_spread / (1 + z * z / n)


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean of ≥ 2 values and the half-width of its 95% Student-t interval."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, T95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))


def mean_ci(values: Sequence[float], n_test: int) -> tuple[float, float]:
    """Mean over seeds and its 95% half-width (one seed: Wilson on ``n_test`` problems)."""
    if len(values) == 1:
        return values[0], wilson_half_width(values[0], n_test)
    return t_interval(values)


def welch_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and the half-width of its 95% Welch interval (degrees of freedom rounded
    down, so the interval errs wide). The seed-to-seed spread of students is what decides whether a
    gap between two points is real, so the report states it for the key points."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Welch interval needs at least two seeds on each side")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return ma - mb, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return ma - mb, T95.get(max(int(df), 1), 1.96) * math.sqrt(va + vb)


def interpolate(curve: Sequence[tuple[float, float]], x: float) -> float:
    """y at x on the piecewise-linear curve through ``curve`` (sorted by x; clamped at the ends)."""
    pts = sorted(curve)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def aggregate(results: Sequence[dict[str, Any]]) -> list[PointStat]:
    """Per grid point: teacher and student accuracy, mean over seeds with 95% half-widths."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["mode"], r["value"]), []).append(r)
    stats = []
    for (mode, value), rows in groups.items():
        n = rows[0]["n_test"]
        t, tci = mean_ci([r["teacher_accuracy"] for r in rows], n)
        s, sci = mean_ci([r["student_accuracy"] for r in rows], n)
        stats.append(PointStat(mode, value, len(rows), t, tci, s, sci))
    return stats


def student_accuracy(row: dict[str, Any]) -> float | None:
    return row["student_accuracy"]


def paired_gaps(
    results: Sequence[dict[str, Any]],
    mode: str,
    value: float,
    metric: Callable[[dict[str, Any]], float | None] = student_accuracy,
) -> dict[int, float]:
    """Per seed: ``metric`` of the temperature student at this point's teacher accuracy (interpolated
    on that seed's own temperature curve) minus this point's. Every mode at a seed draws the same
    random stream (sampling.request_seed), so the seed-to-seed noise the two share cancels here,
    where an unpaired (Welch) difference carries it twice. Seeds lacking a temperature curve, and
    rows whose metric is None, are left out."""
    curves: dict[int, list[tuple[float, float]]] = {}
    for r in results:
        if r["mode"] == "temperature" and metric(r) is not None:
            curves.setdefault(r["seed"], []).append((r["teacher_accuracy"], metric(r)))
    return {
        r["seed"]: interpolate(curves[r["seed"]], r["teacher_accuracy"]) - metric(r)
        for r in results
        if r["mode"] == mode and r["value"] == value and r["seed"] in curves and metric(r) is not None
    }


def paired_by_key(results: Sequence[dict[str, Any]], key_points: Sequence[str]) -> dict[str, dict[str, Any]]:
    """For each non-temperature key point: its per-seed paired gaps, their mean and 95% t half-width
    (None under two paired seeds)."""
    out = {}
    for key in key_points:
        mode, _, raw = key.partition("@")
        if mode != "temperature":
            gaps = paired_gaps(results, mode, float(raw))
            mean, half = t_interval(list(gaps.values())) if len(gaps) >= 2 else (None, None)
            out[key] = {"per_seed": gaps, "mean": mean, "half_width": half}
    return out


def mechanism_by_point(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, float]]]]:
    """Per grid point and model (student, proxy): the fine-tuning curve averaged over seeds at each
    checkpoint (training loss since the last checkpoint, NLL on clean held-out traces)."""
    curves: dict[str, dict[str, list[list[dict[str, Any]]]]] = {}
    for r in results:
        for model, curve in (r.get("mechanism") or {}).items():
            if curve:
                curves.setdefault(point_name(r["mode"], r["value"]), {}).setdefault(model, []).append(curve)
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    for name, by_model in curves.items():
        for model, runs in by_model.items():
            points = []
            for marks in zip(*runs, strict=False):
                train = [m["train_loss"] for m in marks if m["train_loss"] is not None]
                points.append(
                    {
                        "step": marks[0]["step"],
                        "train_loss": sum(train) / len(train) if train else None,
                        "heldout": sum(m["heldout"] for m in marks) / len(marks),
                    }
                )
            out.setdefault(name, {})[model] = points
    return out


def trace_quality_by_point(traces: dict[tuple[str, float, int], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per grid point (over its seeds): the mean of each trace-quality figure of the distill traces
    (core/trace_quality.py) and the lowest seed's sample traces. Runs recorded before trace quality
    was measured are left out."""
    by_point: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for (mode, value, seed), meta in sorted(traces.items(), key=lambda kv: kv[0][2]):
        if "quality" in meta:
            by_point.setdefault(point_name(mode, value), []).append((seed, meta))
    return {
        name: {
            **{k: sum(m["quality"][k] for _, m in runs) / len(runs) for k in QUALITY_FIGURES},
            "seeds": len(runs),
            "samples": runs[0][1].get("samples", []),
        }
        for name, runs in by_point.items()
    }
