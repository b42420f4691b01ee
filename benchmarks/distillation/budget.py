"""The teacher budget's strength: from a sweep of teacher accuracy against b, the largest b that
costs at most the budget — read with ``antidistill tune``'s rule (every smaller swept b must stay
within it too), so a sweep that dips, recovers and dips again is not read as safe in the middle."""

from __future__ import annotations

from collections.abc import Sequence

from antidistill.server.tune.report import Tolerance, recommend


def budget_strength(values: Sequence[float], accuracies: Sequence[float], base: float, budget: float) -> float:
    """The largest of ``values`` (ascending b) whose teacher accuracy, and every smaller value's, is
    at most ``budget`` below ``base`` (the accuracy at b = 0); 0 when even the smallest costs more."""
    points = [{"profile": "ad", "strength": 0.0, "accuracy": base}]
    points += [{"profile": "ad", "strength": b, "accuracy": a} for b, a in zip(values, accuracies, strict=True)]
    tolerance = Tolerance(f"≤ {100 * budget:g} points", "accuracy", budget, relative=False, worse="lower")
    return recommend(points, [tolerance])[0]["max_strength"]
