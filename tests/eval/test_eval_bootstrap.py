"""The paired bootstrap over test problems and seeds on synthetic registries whose intervals are
known: the problem-sampling width of a difference of proportions, luck shared by every mode at a
seed cancelling, and the seed-level t interval kept for runs without per-problem correctness."""

from __future__ import annotations

import json
import math

import pytest
from antidistill.benchmarks.distillation.bootstrap import paired_bootstrap
from antidistill.benchmarks.distillation.config import load_eval_config
from antidistill.benchmarks.distillation.paired import paired_by_key
from antidistill.benchmarks.distillation.report import paired_lines, write_report
from antidistill.benchmarks.distillation.scoring import accuracy, correctness

N = 2000  # test problems


def first(k: int, shift: int = 0) -> list[int]:
    """Correct on problems shift .. shift + k − 1 (of N)."""
    return [int(shift <= i < shift + k) for i in range(N)]


def row(mode: str, value: float, seed: int, teacher: list[int], student: list[int]) -> dict:
    return {
        "mode": mode,
        "value": value,
        "seed": seed,
        "n_test": N,
        "teacher_accuracy": sum(teacher) / N,
        "student_accuracy": sum(student) / N,
        "teacher_correct": teacher,
        "student_correct": student,
    }


def registry(seeds: int, luck: int = 0) -> list[dict]:
    """Temperature@0.8: teacher 90 %, student 60 %; AD@1: teacher 88 %, student 50 %, on the same
    problems minus 200 (a gap of exactly 10 points) and 40 (a teacher cost of 2 points). At seed s
    both students solve ``luck``·s more problems: the seed's luck, shared by the modes."""
    rows = []
    for s in range(seeds):
        extra = luck * s
        rows.append(row("temperature", 0.8, s, first(1800), first(1200 + extra)))
        rows.append(row("antidistillation", 1.0, s, first(1760), first(1000 + extra)))
    return rows


def test_scoring_keeps_one_mark_per_problem():
    problems = [{"answer": "7"}, {"answer": "5"}, {"answer": "2"}]
    marks = correctness(["#### 7", "#### 4", "so \\boxed{2}"], problems)
    assert marks == [1, 0, 1] and accuracy(["#### 7", "#### 4", "so \\boxed{2}"], problems) == pytest.approx(2 / 3)


def test_identical_seeds_leave_the_problem_sampling_width_of_a_paired_difference():
    """With the same vectors at every seed, the seed-level t interval is zero-wide, yet 2,000
    problems carry a sampling error: the paired bootstrap gives the paired difference of
    proportions its normal-theory width, 1.96·sqrt(p(1 − p)/N) for the share p of problems
    where the two differ."""
    rows = registry(seeds=3)
    boot = paired_bootstrap(rows, "antidistillation", 1.0, base_temperature=0.8)
    assert boot is not None and boot["problems"] == N and boot["seeds"] == 3
    gap_half = 1.96 * math.sqrt(0.1 * 0.9 / N)  # 0.0131
    assert boot["gap"]["low"] == pytest.approx(0.10 - gap_half, abs=0.003)
    assert boot["gap"]["high"] == pytest.approx(0.10 + gap_half, abs=0.003)
    cost_half = 1.96 * math.sqrt(0.02 * 0.98 / N)  # 0.0061
    assert boot["teacher_cost"]["low"] == pytest.approx(0.02 - cost_half, abs=0.0015)
    assert boot["teacher_cost"]["high"] == pytest.approx(0.02 + cost_half, abs=0.0015)
    paired = paired_by_key(rows, ["antidistillation@1"], base_temperature=0.8)["antidistillation@1"]
    assert paired["mean"] == pytest.approx(0.10) and paired["half_width"] == pytest.approx(0.0)
    assert paired["interval"]["method"] == "bootstrap" and paired["interval"]["low"] == boot["gap"]["low"]
    assert paired["teacher_cost"]["interval"]["high"] == boot["teacher_cost"]["high"]
    [line] = paired_lines({"antidistillation@1": paired})
    assert line.startswith("- antidistillation@1: +10.0 [+8.") and "(cost +2.0 [+1." in line


def test_luck_shared_by_every_mode_at_a_seed_cancels():
    """Students 0–20 points luckier from seed to seed in every mode alike, with the same 10-point
    gap: paired over seeds and problems, the interval stays about as narrow as without the luck
    (unpaired, the 20-point spread of either mode's students would swamp it)."""
    lucky = paired_bootstrap(registry(seeds=5, luck=100), "antidistillation", 1.0, base_temperature=0.8)
    plain = paired_bootstrap(registry(seeds=5), "antidistillation", 1.0, base_temperature=0.8)
    width = lucky["gap"]["high"] - lucky["gap"]["low"]
    assert width < 1.5 * (plain["gap"]["high"] - plain["gap"]["low"]) and width < 0.04
    assert lucky["gap"]["low"] < 0.10 < lucky["gap"]["high"]


def test_seed_spread_widens_the_interval():
    """Per-seed gaps of 5, 10 and 15 points: the interval covers the seed spread, not only the
    problem sampling of one seed."""
    rows = []
    for s, ad in enumerate((1100, 1000, 900)):
        rows.append(row("temperature", 0.8, s, first(1800), first(1200)))
        rows.append(row("antidistillation", 1.0, s, first(1800), first(ad)))
    boot = paired_bootstrap(rows, "antidistillation", 1.0, base_temperature=0.8)
    assert boot["gap"]["low"] < 0.07 and boot["gap"]["high"] > 0.13


def test_the_bootstrap_is_reproducible_and_needs_per_problem_correctness():
    rows = registry(seeds=3)
    assert paired_bootstrap(rows, "antidistillation", 1.0, 0.8) == paired_bootstrap(rows, "antidistillation", 1.0, 0.8)
    old = [{k: v for k, v in r.items() if k != "teacher_correct"} for r in rows]
    assert paired_bootstrap(old, "antidistillation", 1.0, 0.8) is None
    paired = paired_by_key(old, ["antidistillation@1"], base_temperature=0.8)["antidistillation@1"]
    assert paired["bootstrap"] is None and paired["interval"]["method"] == "t"  # seed-level t, as before
    short = [*rows[:-1], {**rows[-1], "student_correct": rows[-1]["student_correct"][:10]}]
    with pytest.raises(ValueError, match="different numbers of test problems"):
        paired_bootstrap(short, "antidistillation", 1.0, 0.8)


def test_the_report_stores_per_problem_correctness_and_reads_the_verdict_at_the_named_point(tmp_path):
    """write_report on a registry with per-problem correctness: the registry rows keep the vectors,
    summary.json's ``paired`` has bootstrap intervals of the gap and the teacher cost, and the
    verdict is read at ``grid.verdict_point`` even where another AD point has a larger gap."""
    cfg = load_eval_config("micro")
    grid = cfg.grid.model_copy(
        update={
            "temperature": [0.8],
            "antidistillation": [1.0, 2.0],
            "permutation": [],
            "key_points": ["antidistillation@1", "antidistillation@2"],
            "verdict_point": "antidistillation@1",
        }
    )
    cfg = cfg.model_copy(update={"grid": grid})
    rows = registry(seeds=5)
    rows += [row("antidistillation", 2.0, s, first(1780), first(800)) for s in range(5)]  # 20-point gap, not named
    verdict = write_report(cfg, rows, 0.05, {"teacher": 1.0}, 1.0, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    named = summary["verdict"]["paired"]
    assert named["point"] == "antidistillation@1" and named["gap"] == pytest.approx(0.10)
    assert named["interval"]["method"] == "bootstrap" and named["interval"]["low"] < 0.10 < named["interval"]["high"]
    assert named["teacher_cost"]["mean"] == pytest.approx(0.02) and named["target_met"] and not named["target_shown"]
    assert verdict["target_met"] == named["target_met"]
    assert summary["paired"]["antidistillation@2"]["mean"] == pytest.approx(0.20)
    assert summary["paired"]["antidistillation@2"]["bootstrap"]["problems"] == N
    page = (tmp_path / "summary.md").read_text()
    assert "verdict point antidistillation@1: paired gap +10.0 [" in page and "paired bootstrap over 2000" in page
