"""The report's statistics, verdict and lines on constructed registries: intervals, paired gaps
against each seed's own temperature curve read at the point's mean teacher accuracy, Welch
differences, both verdicts at the named verdict point, stage times."""

from __future__ import annotations

import dataclasses
import math

import pytest
from antidistill.benchmarks.distillation.paired import paired_by_key
from antidistill.benchmarks.distillation.report import (
    busy_seconds,
    key_point_differences,
    paired_lines,
    timing_lines,
    verdict_line,
)
from antidistill.benchmarks.distillation.stats import (
    PointStat,
    interpolate,
    mean_ci,
    paired_gaps,
    t_interval,
    teacher_costs,
    welch_difference,
    wilson_half_width,
)
from antidistill.benchmarks.distillation.student_t import t_critical
from antidistill.benchmarks.distillation.verdict import paired_verdict, unpaired_verdict


def test_verdict_compares_at_matched_teacher_accuracy():
    stats = [
        PointStat("temperature", 0.8, 3, 0.90, 0.01, 0.60, 0.02),
        PointStat("temperature", 1.5, 1, 0.70, 0.03, 0.40, 0.03),
        PointStat("antidistillation", 1, 3, 0.89, 0.01, 0.45, 0.02),
        PointStat("antidistillation", 4, 1, 0.80, 0.03, 0.10, 0.03),
        PointStat("permutation", 1, 3, 0.89, 0.01, 0.58, 0.02),
    ]
    v = unpaired_verdict(stats, base_temperature=0.8, point="antidistillation@1")
    ad = v["antidistillation"]
    # b = 1 is compared with the temperature curve at 0.89, the permutation control at the same b
    assert ad["value"] == 1
    assert ad["temperature_student_at_same_teacher"] == pytest.approx(0.59)
    assert ad["gap"] == pytest.approx(0.14) and v["target_met"]
    assert v["permutation"]["gap"] == pytest.approx(0.01)
    # b = 4 has the larger gap (0.40) but loses 10 teacher points: named, it does not meet the target
    v = unpaired_verdict(stats, base_temperature=0.8, point="antidistillation@4")
    assert v["antidistillation"]["gap"] == pytest.approx(0.40) and not v["target_met"] and v["permutation"] is None
    weaker = [
        s if s.mode != "antidistillation" else PointStat(s.mode, s.value, 3, s.teacher, 0, 0.55, 0) for s in stats
    ]
    assert not unpaired_verdict(weaker, base_temperature=0.8, point="antidistillation@1")["target_met"]
    lucky = [s if s.mode != "antidistillation" else dataclasses.replace(s, seeds=1) for s in stats]
    v = unpaired_verdict(lucky, base_temperature=0.8, point="antidistillation@1")
    assert v["antidistillation"]["gap"] == pytest.approx(0.14) and not v["target_met"]  # one seed is not enough
    assert not unpaired_verdict(stats, base_temperature=0.8, point=None)["target_met"]


def run_row(mode: str, value: float, seed: int, teacher: float, student: float) -> dict:
    return dict(mode=mode, value=value, seed=seed, teacher_accuracy=teacher, student_accuracy=student, n_test=100)


def test_paired_gaps_use_each_seeds_own_temperature_curve():
    """Seed 1 is a lucky stream for every mode (+10 points): paired, the luck cancels; unpaired
    (Welch) it widens the interval."""
    rows = []
    for seed, luck in ((0, 0.0), (1, 0.10), (2, 0.02)):
        rows += [
            run_row("temperature", 0.8, seed, 0.90, 0.60 + luck),
            run_row("temperature", 1.5, seed, 0.70, 0.40 + luck),
        ]
        rows.append(run_row("antidistillation", 2.0, seed, 0.85, 0.40 + luck + 0.01 * seed))
    gaps = paired_gaps(rows, "antidistillation", 2.0)
    # temperature at teacher 0.85 on each seed's curve: 0.55 + luck; minus 0.40 + luck + 0.01·seed
    assert gaps == pytest.approx({0: 0.15, 1: 0.14, 2: 0.13})
    mean, half = t_interval(list(gaps.values()))
    assert mean == pytest.approx(0.14) and half == pytest.approx(4.303 * 0.01 / 3**0.5, rel=1e-4)
    _, welch_half = welch_difference(
        [r["student_accuracy"] for r in rows if r["mode"] == "temperature" and r["value"] == 0.8],
        [r["student_accuracy"] for r in rows if r["mode"] == "antidistillation"],
    )
    assert welch_half > 4 * half  # the shared luck is noise to the unpaired difference
    rows.append(run_row("antidistillation", 2.0, 3, 0.85, 0.30))  # seed 3 has no temperature curve
    assert set(paired_gaps(rows, "antidistillation", 2.0)) == {0, 1, 2}
    paired = paired_by_key(rows, ["temperature@0.8", "antidistillation@2"], base_temperature=0.8)
    assert set(paired) == {"antidistillation@2"} and paired["antidistillation@2"]["mean"] == pytest.approx(0.14)
    assert paired["antidistillation@2"]["interval"]["method"] == "t"  # no per-problem correctness: t over seeds
    [line] = paired_lines(paired)
    assert line == "- antidistillation@2: +14.0 ± 2.5 pts over 3 paired seeds, at teacher 85.0% (cost +5.0 ± 0.0 pts)"


def test_gaps_are_read_at_the_points_mean_teacher_accuracy():
    """Each seed's test problems move the teacher's accuracy by a point or two: every seed's gap is
    read at the point's mean teacher accuracy, on curves whose knots sit at the temperature points'
    means, so that noise stays out of the gaps (here the students agree on both seeds, and so do the
    gaps; read at each seed's own teacher accuracy they would be 9.7 and 10.2 points)."""
    rows = []
    for seed, noise in ((0, -0.01), (1, 0.01)):
        rows += [
            run_row("temperature", 0.8, seed, 0.90 + noise, 0.60),
            run_row("temperature", 1.5, seed, 0.70, 0.40),
            run_row("antidistillation", 1.0, seed, 0.85 + noise, 0.45),
        ]
    assert paired_gaps(rows, "antidistillation", 1.0) == pytest.approx({0: 0.10, 1: 0.10})
    assert teacher_costs(rows, "antidistillation", 1.0, 0.8) == pytest.approx({0: 0.05, 1: 0.05})
    paired = paired_by_key(rows, ["antidistillation@1"], base_temperature=0.8)["antidistillation@1"]
    assert paired["half_width"] == pytest.approx(0.0) and paired["teacher"] == pytest.approx(0.85)
    assert paired["teacher_cost"]["mean"] == pytest.approx(0.05) and paired["baseline_teacher"] == pytest.approx(0.90)


def test_paired_verdict_is_read_at_the_named_point_on_five_paired_seeds_within_the_budget():
    rows = []
    for seed in range(5):
        rows += [run_row("temperature", 0.8, seed, 0.90, 0.60), run_row("temperature", 1.5, seed, 0.70, 0.40)]
        rows.append(run_row("antidistillation", 1.0, seed, 0.89, 0.47 + 0.01 * (seed % 2)))  # gap ≈ 12 pts
        rows.append(run_row("antidistillation", 0.5, seed, 0.895, 0.40))  # a larger gap (19.5 pts), not named
        rows.append(run_row("antidistillation", 4.0, seed, 0.80, 0.10))  # 10 teacher points lost
    keys = ["temperature@0.8", "antidistillation@0.5", "antidistillation@1", "antidistillation@4"]
    paired = paired_by_key(rows, keys, base_temperature=0.8)
    v = paired_verdict(paired, "antidistillation@1")
    # the named point is read, not the best one (that would be b = 0.5: the winner's curse)
    assert v["point"] == "antidistillation@1" and v["seeds"] == 5 and v["target_met"] and v["within_budget"]
    assert v["gap"] == pytest.approx(0.59 - 0.474)  # the curve at teacher 0.89 is 0.59 on every seed
    assert v["teacher_cost"]["mean"] == pytest.approx(0.01)
    # the intervals support it too: gap 11.6 ± 0.7 ≥ 10, cost 1 ± 0 ≤ 2
    assert v["target_shown"] and v["interval"]["low"] >= 0.10
    assert "+11.6 ±" in verdict_line(v) and "over 5 seeds" in verdict_line(v) and "cost +1.0 ± 0.0" in verdict_line(v)
    v = paired_verdict(paired, "antidistillation@4")
    assert v["gap"] == pytest.approx(0.40) and not v["within_budget"] and not v["target_met"]
    four = [r for r in rows if r["seed"] < 4]
    v = paired_verdict(paired_by_key(four, keys, base_temperature=0.8), "antidistillation@1")
    assert v["gap"] == pytest.approx(0.115) and not v["target_met"]  # the same gap on 4 seeds does not count
    noisy = [
        {**r, "student_accuracy": r["student_accuracy"] + (0.04 if r["seed"] % 2 else -0.04)}
        if r["mode"] == "antidistillation"
        else r
        for r in rows
    ]
    v = paired_verdict(paired_by_key(noisy, keys, base_temperature=0.8), "antidistillation@1")
    assert v["target_met"] and not v["target_shown"]  # mean ≥ 10, but the interval reaches below it
    for point in (None, "antidistillation@2"):
        v = paired_verdict(paired, point)
        assert v["point"] is None and not v["target_met"] and not v["target_shown"]


def test_busy_seconds_is_the_union_of_intervals():
    assert busy_seconds([]) == 0
    assert busy_seconds([(0, 10), (5, 12), (20, 21)]) == 13  # two overlapping, one apart
    assert busy_seconds([(0, 10), (2, 3)]) == 10  # one inside another
    lines = timing_lines({"teacher": 100, "student/a#0": 50, "student/b#0": 50}, students_wall=55)
    assert "| student/* (2 runs, 100 s of work) | 55 |" in lines and lines[-1] == "| **total** | **155** |"


def test_intervals():
    assert wilson_half_width(0.5, 100) == pytest.approx(0.0962, abs=1e-3)
    mean, half = mean_ci([0.4, 0.5, 0.6], n_test=100)
    assert mean == pytest.approx(0.5) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)
    # 12 seeds: t with 11 degrees of freedom (2.201), not the normal 1.96
    _, half = t_interval([0.4, 0.6] * 6)
    assert half == pytest.approx(2.201 * math.sqrt(0.12 / 11) / math.sqrt(12), rel=1e-4)
    assert interpolate([(0.7, 0.4), (0.9, 0.6)], 0.8) == pytest.approx(0.5)
    assert interpolate([(0.7, 0.4), (0.9, 0.6)], 0.95) == 0.6


def test_welch_difference_of_key_points():
    # Welch: se = sqrt(0.01/3 + 0.01/3 / 3) = 0.0667, df = 3.2: the exact t quantile at 3.2 degrees
    # of freedom (3.0728), between the table's 3.182 (3 df) and 2.776 (4 df)
    diff, half = welch_difference([0.6, 0.7, 0.8], [0.5, 0.5, 0.6])
    se = math.sqrt(0.01 / 3 + 0.01 / 9)
    assert diff == pytest.approx(1 / 6) and half == pytest.approx(t_critical(3.2) * se)
    assert 2.776 * se < half < 3.182 * se and t_critical(3.2) == pytest.approx(3.0728, abs=1e-4)
    assert welch_difference([0.5, 0.5], [0.4, 0.4]) == (pytest.approx(0.1), 0.0)
    with pytest.raises(ValueError, match="two seeds"):
        welch_difference([0.5], [0.4, 0.6])
    rows = [{"mode": "temperature", "value": 0.8, "student_accuracy": a} for a in (0.5, 0.5, 0.6)]
    rows += [{"mode": "antidistillation", "value": 0.05, "student_accuracy": a} for a in (0.6, 0.7, 0.8)]
    rows += [{"mode": "permutation", "value": 0.05, "student_accuracy": 0.7}]  # one seed: no line
    lines = key_point_differences(
        rows, ["temperature@0.8", "antidistillation@0.05", "permutation@0.05"], "temperature@0.8"
    )
    assert lines == [f"- antidistillation@0.05 − temperature@0.8: +16.7 ± {100 * half:.1f} pts"]
