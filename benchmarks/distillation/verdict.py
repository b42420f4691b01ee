"""The verdict on the target, read off the statistics (stats.py).

Target (the product's claim, after the paper's Figure 3): at ≤ 2 points of teacher-accuracy loss
relative to plain sampling at the AD temperature, the antidistillation student is ≥ 10 points below
the temperature-sampling student AT THE SAME TEACHER ACCURACY (read off the temperature curve by
linear interpolation). The verdict is read on the *paired* gaps of the key points (per seed, against
that seed's own temperature curve: every mode at a seed shares its random stream), with ≥ 5 paired
seeds; the unpaired reading over per-point means (≥ 3 seeds) is reported beside it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from antidistill.benchmarks.distillation.config import TEACHER_LOSS_ALLOWED, point_name
from antidistill.benchmarks.distillation.stats import PointStat, interpolate

TARGET_GAP = 0.10
MIN_SEEDS = 3  # seeds the deciding AD point needs before the unpaired reading can count the target met
PAIRED_MIN_SEEDS = 5  # paired seeds the deciding key point needs before the verdict can count the target met


def paired_verdict(
    paired: dict[str, dict[str, Any]], stats: Sequence[PointStat], base_temperature: float
) -> dict[str, Any]:
    """The verdict on the paired gaps (stats.paired_by_key): the AD key point within the teacher
    budget with the largest mean paired gap, and whether it reaches the target on ≥ PAIRED_MIN_SEEDS
    paired seeds."""
    base = next((s for s in stats if s.mode == "temperature" and s.value == base_temperature), None)
    if base is None:
        return {"target_met": False, "point": None, "reason": f"no temperature@{base_temperature:g} point"}
    teacher = {point_name(s.mode, s.value): s.teacher for s in stats}
    eligible = {
        key: p
        for key, p in paired.items()
        if key.startswith("antidistillation@")
        and p["mean"] is not None
        and teacher.get(key, -1.0) >= base.teacher - TEACHER_LOSS_ALLOWED
    }
    if not eligible:
        return {"target_met": False, "point": None, "reason": "no AD key point with paired seeds within the budget"}
    key, best = max(eligible.items(), key=lambda kv: kv[1]["mean"])
    seeds = len(best["per_seed"])
    return {
        "target_met": best["mean"] >= TARGET_GAP and seeds >= PAIRED_MIN_SEEDS,
        "point": key,
        "gap": best["mean"],
        "half_width": best["half_width"],
        "seeds": seeds,
        "teacher": teacher[key],
        "baseline_teacher": base.teacher,
    }


def unpaired_verdict(stats: Sequence[PointStat], base_temperature: float) -> dict[str, Any]:
    """The unpaired reading over per-point means: the best AD and permutation points within the
    allowed teacher loss, against the temperature curve."""
    temp = [s for s in stats if s.mode == "temperature"]
    base = next((s for s in temp if s.value == base_temperature), None)
    base = base or next((s for s in stats if s.mode == "antidistillation" and s.value == 0), None)
    if base is None or len(temp) < 1:
        return {"target_met": False, "reason": "grid lacks a temperature curve or a baseline point"}
    curve = [(s.teacher, s.student) for s in temp]
    out: dict[str, Any] = {"baseline": asdict(base), "allowed_teacher_loss": TEACHER_LOSS_ALLOWED}
    for mode in ("antidistillation", "permutation"):
        eligible = [
            s for s in stats if s.mode == mode and s.value > 0 and s.teacher >= base.teacher - TEACHER_LOSS_ALLOWED
        ]
        best = max(eligible, key=lambda s: interpolate(curve, s.teacher) - s.student, default=None)
        if best is None:
            out[mode] = None
            continue
        matched = interpolate(curve, best.teacher)
        out[mode] = {**asdict(best), "temperature_student_at_same_teacher": matched, "gap": matched - best.student}
    ad = out.get("antidistillation")
    # the best of several single-seed points is the luckiest one: a gap counts only with enough seeds
    out["target_met"] = bool(ad and ad["gap"] >= TARGET_GAP and ad["seeds"] >= MIN_SEEDS)
    return out
