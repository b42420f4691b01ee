"""`antidistill tune`'s recommendation: the largest strength every smaller one of which is within tolerance."""

from __future__ import annotations

from antidistill.server.tune_report import Tolerance, recommend


def point(strength, accuracy, nll, profile="math"):
    return {"profile": profile, "strength": strength, "accuracy": accuracy, "teacher_nll": nll, "degenerate_rate": 0}


def test_recommendation_stops_at_the_first_strength_outside_the_tolerance():
    points = [point(0, 0.80, 1.00), point(0.5, 0.80, 1.03), point(1, 0.78, 1.10), point(2, 0.80, 1.04)]
    accuracy = Tolerance("acc", "accuracy", 0.01, False, False)
    nll = Tolerance("nll", "teacher_nll", 0.05, True, True)
    by = {r["tolerance"]: r["max_strength"] for r in recommend(points, (accuracy, nll))}
    assert by == {"acc": 0.5, "nll": 0.5}, "strength 2 recovers, but 1 broke the tolerance first"


def test_recommendation_is_per_profile_and_zero_when_nothing_holds():
    points = [point(0, 0.8, 1.0, "a"), point(1, 0.5, 1.0, "a"), point(0, 0.8, 1.0, "b"), point(1, 0.8, 1.0, "b")]
    accuracy = Tolerance("acc", "accuracy", 0.01, False, False)
    assert recommend(points, (accuracy,)) == [
        {"profile": "a", "tolerance": "acc", "max_strength": 0.0},
        {"profile": "b", "tolerance": "acc", "max_strength": 1.0},
    ]
