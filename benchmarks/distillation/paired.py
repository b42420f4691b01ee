"""The paired reading of a key point, which the verdict is read on: its accuracy gap to the
temperature curve at its mean teacher accuracy (stats.paired_gaps) and its teacher cost on the
test split (stats.teacher_costs), each with the mean over paired seeds, the seed-level t
half-width and the interval the verdict uses: the paired bootstrap over problems and seeds where
the registry has per-problem correctness (bootstrap.py), else the t interval (older runs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from antidistill.benchmarks.distillation.bootstrap import paired_bootstrap
from antidistill.benchmarks.distillation.stats import paired_gaps, t_interval, teacher_costs


def seed_summary(per_seed: dict[int, float]) -> dict[str, Any]:
    """Per-seed values, their mean and 95% t half-width (both None under two seeds)."""
    mean, half = t_interval(list(per_seed.values())) if len(per_seed) >= 2 else (None, None)
    return {"per_seed": per_seed, "mean": mean, "half_width": half}


def with_interval(summary: dict[str, Any], boot: dict[str, float] | None) -> dict[str, Any]:
    """``summary`` with the interval the verdict reads: the bootstrap's when given, else mean ± t."""
    if boot is not None and summary["mean"] is not None:
        return {**summary, "interval": {**boot, "method": "bootstrap"}}
    if summary["mean"] is None:
        return {**summary, "interval": None}
    low, high = summary["mean"] - summary["half_width"], summary["mean"] + summary["half_width"]
    return {**summary, "interval": {"low": low, "high": high, "method": "t"}}


def mean_teacher(results: Sequence[dict[str, Any]], mode: str, value: float | None, seeds: set[int]) -> float | None:
    """The point's mean teacher accuracy over ``seeds`` (None: no such run)."""
    rows = [r["teacher_accuracy"] for r in results if r["mode"] == mode and r["value"] == value and r["seed"] in seeds]
    return sum(rows) / len(rows) if rows else None


def paired_point(
    results: Sequence[dict[str, Any]], mode: str, value: float, base_temperature: float | None
) -> dict[str, Any]:
    """A point's paired gap and teacher cost (against temperature ``base_temperature``), with
    intervals; ``bootstrap`` says how the intervals were drawn (None: seed-level t)."""
    gap = seed_summary(paired_gaps(results, mode, value))
    seeds = set(gap["per_seed"])
    teacher, base = (
        mean_teacher(results, mode, value, seeds),
        mean_teacher(results, "temperature", base_temperature, seeds),
    )
    costs = {s: c for s, c in teacher_costs(results, mode, value, base_temperature).items() if s in seeds}
    boot = paired_bootstrap(results, mode, value, base_temperature) if base_temperature is not None else None
    return {
        **with_interval(gap, boot and boot["gap"]),
        "teacher": teacher,
        "baseline_teacher": base,
        "teacher_cost": with_interval(seed_summary(costs), boot and boot["teacher_cost"]),
        "bootstrap": boot and {k: v for k, v in boot.items() if k not in ("gap", "teacher_cost")},
    }


def paired_by_key(
    results: Sequence[dict[str, Any]], key_points: Sequence[str], base_temperature: float | None = None
) -> dict[str, dict[str, Any]]:
    """``paired_point`` for each non-temperature key point."""
    out = {}
    for key in key_points:
        mode, _, raw = key.partition("@")
        if mode != "temperature":
            out[key] = paired_point(results, mode, float(raw), base_temperature)
    return out


def estimate(stat: dict[str, Any], scale: float = 100, digits: int = 1) -> str:
    """A mean with its interval: ``+8.2 ± 7.0`` (t) or ``+8.2 [+1.4, +15.0]`` (bootstrap, asymmetric)."""
    if stat["mean"] is None:
        return "-"
    mean, interval = scale * stat["mean"], stat["interval"]
    if interval["method"] == "t":
        return f"{mean:+.{digits}f} ± {scale * stat['half_width']:.{digits}f}"
    return f"{mean:+.{digits}f} [{scale * interval['low']:+.{digits}f}, {scale * interval['high']:+.{digits}f}]"
