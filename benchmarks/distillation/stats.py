"""Statistics over a registry of grid runs (one row per mode, value and seed): per-point means with
95% intervals, differences between points, paired gaps per seed read at the point's mean teacher
accuracy, and the per-point means of the fine-tuning curves and trace quality. Intervals: over
seeds, a 95% Student-t interval of the mean with the exact quantile (student_t.py); a single-seed
point gets the 95% Wilson interval of its test accuracy instead. The resampling of problems and
seeds is bootstrap.py's."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from antidistill.benchmarks.distillation.config import point_name
from antidistill.benchmarks.distillation.student_t import t_critical

Cell = tuple[str, float, int]  # (mode, value, seed) of one grid run
Cells = Mapping[Cell, tuple[float, float]]  # a grid run's (teacher accuracy, student metric)
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
    return mean, t_critical(len(values) - 1) * sd / math.sqrt(len(values))


def mean_ci(values: Sequence[float], n_test: int) -> tuple[float, float]:
    """Mean over seeds and its 95% half-width (one seed: Wilson on ``n_test`` problems)."""
    if len(values) == 1:
        return values[0], wilson_half_width(values[0], n_test)
    return t_interval(values)


def welch_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and the half-width of its 95% Welch interval (the exact t quantile at the
    Welch–Satterthwaite degrees of freedom, fractional as they come). The seed-to-seed spread of
    students is what decides whether a gap between two points is real, so the report states it for
    the key points."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Welch interval needs at least two seeds on each side")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return ma - mb, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return ma - mb, t_critical(df) * math.sqrt(va + vb)


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


def weighted_mean(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Σ w·x / Σ w over (w, x) pairs; None when the weights sum to 0."""
    total = sum(w for w, _ in pairs)
    return sum(w * x for w, x in pairs) / total if total > 0 else None


def matched_gaps(cells: Cells, mode: str, value: float, weights: Mapping[int, float] | None = None) -> dict[int, float]:
    """Per seed of the point that has a temperature curve (and weight > 0): the temperature metric at
    the point's MEAN teacher accuracy, read on that seed's own temperature curve whose knots sit at
    each temperature point's mean teacher accuracy, minus the point's metric. Means are over the
    point's paired seeds, weighted by ``weights`` (a bootstrap draw's seed counts; default 1 each).
    Reading at a seed's own teacher accuracy would let the 1–3 points of teacher sampling noise of
    one seed's test split into its gap; the mean keeps the pairing of the students (every mode at a
    seed shares its random stream) without that noise."""
    curve_seeds = {s for m, _, s in cells if m == "temperature"}
    seeds = sorted(s for m, v, s in cells if m == mode and v == value and s in curve_seeds)
    weight = {s: 1.0 if weights is None else float(weights.get(s, 0.0)) for s in seeds}
    live = [s for s in seeds if weight[s] > 0]

    def mean_teacher(m: str, v: float) -> float | None:
        return weighted_mean([(weight[s], cells[m, v, s][0]) for s in live if (m, v, s) in cells])

    x = mean_teacher(mode, value)
    knots = {v: mean_teacher(m, v) for m, v, _ in cells if m == "temperature"}
    out = {}
    for s in live:
        own = [(k, ("temperature", v, s)) for v, k in knots.items() if k is not None]
        curve = [(k, cells[cell][1]) for k, cell in own if cell in cells]
        out[s] = interpolate(curve, x) - cells[mode, value, s][1]
    return out


def registry_cells(
    results: Sequence[dict[str, Any]], metric: Callable[[dict[str, Any]], float | None] = student_accuracy
) -> dict[Cell, tuple[float, float]]:
    """The registry's (teacher accuracy, metric) per grid run; rows whose metric is None are left out."""
    return {
        (r["mode"], r["value"], r["seed"]): (r["teacher_accuracy"], metric(r)) for r in results if metric(r) is not None
    }


def paired_gaps(
    results: Sequence[dict[str, Any]],
    mode: str,
    value: float,
    metric: Callable[[dict[str, Any]], float | None] = student_accuracy,
) -> dict[int, float]:
    """Per seed: ``metric`` of the temperature student at this point's mean teacher accuracy (on that
    seed's own temperature curve: ``matched_gaps``) minus this point's. Every mode at a seed draws the
    same random stream (sampling.request_seed), so the seed-to-seed noise the two share cancels here,
    where an unpaired (Welch) difference carries it twice. Seeds lacking a temperature curve, and
    rows whose metric is None, are left out."""
    return matched_gaps(registry_cells(results, metric), mode, value)


def teacher_costs(
    results: Sequence[dict[str, Any]], mode: str, value: float, base_temperature: float | None
) -> dict[int, float]:
    """Per seed: the teacher's test-split accuracy at temperature ``base_temperature`` minus at this
    point (positive: the point costs the teacher accuracy), on the seeds both have. Paired because
    both sample the same stream at a seed, so the cost is read without the seed's luck."""
    teacher = {(r["mode"], r["value"], r["seed"]): r["teacher_accuracy"] for r in results}
    return {
        s: teacher["temperature", base_temperature, s] - teacher[m, v, s]
        for m, v, s in teacher
        if m == mode and v == value and ("temperature", base_temperature, s) in teacher
    }


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
