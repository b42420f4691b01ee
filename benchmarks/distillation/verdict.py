"""The verdict on the target, read off the statistics (paired.py, stats.py).

Target (the product's claim, after the paper's Figure 3): at ≤ 2 points of teacher-accuracy loss
relative to plain sampling at the AD temperature (on the test split), the antidistillation student
is ≥ 10 points below the temperature-sampling student AT THE SAME TEACHER ACCURACY (read off the
temperature curve by linear interpolation at the point's mean teacher accuracy). The verdict is
read at ONE point, ``grid.verdict_point``, named in the config before the run: the best of several
points, chosen after seeing them, is the luckiest one (the winner's curse). It is read on the
*paired* gaps (every mode at a seed shares its random stream), with ≥ 5 paired seeds; the unpaired
reading over per-point means (≥ 3 seeds) at the same point is reported beside it. ``target_met``
reads the means against the bar; ``target_shown`` asks the intervals for it too: the gap's lower
bound ≥ 10 points and the teacher cost's upper bound ≤ 2 points."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from antidistill.benchmarks.distillation.config import TEACHER_LOSS_ALLOWED, point_name
from antidistill.benchmarks.distillation.stats import PointStat, interpolate

TARGET_GAP = 0.10
MIN_SEEDS = 3  # seeds the verdict point needs before the unpaired reading can count the target met
PAIRED_MIN_SEEDS = 5  # paired seeds the verdict point needs before the verdict can count the target met
ROUNDING = 1e-9  # a cost or gap of exactly the bar (a whole number of problems) is read as meeting it


def at_most(x: float, bar: float) -> bool:
    return x <= bar + ROUNDING


def at_least(x: float, bar: float) -> bool:
    return x >= bar - ROUNDING


def paired_verdict(paired: dict[str, dict[str, Any]], point: str | None) -> dict[str, Any]:
    """The verdict at the named ``point`` on its paired gap and teacher cost (paired.paired_point)."""
    if point is None:
        return {"target_met": False, "target_shown": False, "point": None, "reason": "no grid.verdict_point named"}
    p = paired.get(point)
    if p is None or p["mean"] is None:
        return {"target_met": False, "target_shown": False, "point": None, "reason": f"no paired seeds at {point}"}
    cost, seeds = p["teacher_cost"], len(p["per_seed"])
    within = cost["mean"] is not None and at_most(cost["mean"], TEACHER_LOSS_ALLOWED)
    met = within and at_least(p["mean"], TARGET_GAP) and seeds >= PAIRED_MIN_SEEDS
    shown = (
        met
        and at_least(p["interval"]["low"], TARGET_GAP)
        and cost["interval"] is not None
        and at_most(cost["interval"]["high"], TEACHER_LOSS_ALLOWED)
    )
    return {
        "target_met": met,
        "target_shown": shown,
        "point": point,
        "gap": p["mean"],
        "half_width": p["half_width"],
        "interval": p["interval"],
        "seeds": seeds,
        "teacher": p["teacher"],
        "baseline_teacher": p["baseline_teacher"],
        "teacher_cost": cost,
        "within_budget": within,
    }


def unpaired_verdict(stats: Sequence[PointStat], base_temperature: float, point: str | None) -> dict[str, Any]:
    """The unpaired reading over per-point means at the named AD ``point`` (and the permutation
    control at the same value, if on the grid), against the temperature curve."""
    temp = [s for s in stats if s.mode == "temperature"]
    base = next((s for s in temp if s.value == base_temperature), None)
    base = base or next((s for s in stats if s.mode == "antidistillation" and s.value == 0), None)
    if base is None or len(temp) < 1 or point is None:
        return {"target_met": False, "reason": "grid lacks a temperature curve, a baseline point or a verdict point"}
    curve = [(s.teacher, s.student) for s in temp]
    out: dict[str, Any] = {"baseline": asdict(base), "allowed_teacher_loss": TEACHER_LOSS_ALLOWED}
    value = float(point.partition("@")[2])
    for mode in ("antidistillation", "permutation"):
        named = next((s for s in stats if point_name(s.mode, s.value) == point_name(mode, value)), None)
        if named is None:
            out[mode] = None
            continue
        matched = interpolate(curve, named.teacher)
        out[mode] = {**asdict(named), "temperature_student_at_same_teacher": matched, "gap": matched - named.student}
    ad = out.get("antidistillation")
    within = bool(ad) and at_most(base.teacher - ad["teacher"], TEACHER_LOSS_ALLOWED)
    out["target_met"] = bool(within and at_least(ad["gap"], TARGET_GAP) and ad["seeds"] >= MIN_SEEDS)
    return out
