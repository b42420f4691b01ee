"""Intervals by a paired bootstrap over test problems and seeds. A seed-level t interval treats a
seed's accuracy on its 100–1,000 test problems as exact; here each replicate redraws the test
problems (one draw for every mode and seed, since all score the same problems) and the seeds (one
draw for every mode, since every mode at a seed shares its random stream), so both sources of
noise enter the interval and the pairing of modes is kept. It needs every run's per-problem
correctness (``teacher_correct``, ``student_correct`` in the registry); runs recorded before they
were stored get None, and the report keeps the seed-level t interval for them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from antidistill.benchmarks.distillation.stats import matched_gaps, weighted_mean

CORRECT_FIELDS = ("teacher_correct", "student_correct")
REPLICATES = 2000
LEVEL = 0.95


def has_problems(row: dict[str, Any]) -> bool:
    """Whether a registry row carries per-problem correctness for both the teacher and the student."""
    return all(row.get(f) is not None for f in CORRECT_FIELDS)


def percentile_interval(values: Sequence[float], level: float = LEVEL) -> dict[str, float]:
    """The central ``level`` share of bootstrap replicates."""
    low, high = np.quantile(np.asarray(values, dtype=float), [(1 - level) / 2, (1 + level) / 2])
    return {"low": float(low), "high": float(high)}


def paired_bootstrap(
    results: Sequence[dict[str, Any]],
    mode: str,
    value: float,
    base_temperature: float | None = None,
    replicates: int = REPLICATES,
    seed: int = 0,
    level: float = LEVEL,
) -> dict[str, Any] | None:
    """Percentile intervals of the point's paired gap (stats.matched_gaps: temperature student at the
    point's mean teacher accuracy minus the point's student, averaged over its paired seeds) and of
    its teacher cost against temperature ``base_temperature`` (base minus point, on the test split).
    None when a run involved lacks per-problem correctness, or the point has no paired seed."""
    rows = [r for r in results if r["mode"] == "temperature" or (r["mode"] == mode and r["value"] == value)]
    if not rows or not all(has_problems(r) for r in rows):
        return None
    n = len(rows[0]["student_correct"])
    if any(len(r[f]) != n for r in rows for f in CORRECT_FIELDS):
        raise ValueError("the runs were scored on different numbers of test problems")
    keys = [(r["mode"], r["value"], r["seed"]) for r in rows]
    teacher = np.array([r["teacher_correct"] for r in rows], dtype=float)
    student = np.array([r["student_correct"] for r in rows], dtype=float)
    full = {k: (float(t.mean()), float(s.mean())) for k, t, s in zip(keys, teacher, student, strict=True)}
    seeds = sorted(matched_gaps(full, mode, value))
    if not seeds:
        return None
    rng = np.random.default_rng(seed)
    problem_weights = rng.multinomial(n, np.full(n, 1 / n), size=replicates) / n
    seed_counts = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size=replicates)
    teacher_acc, student_acc = problem_weights @ teacher.T, problem_weights @ student.T
    base = ("temperature", base_temperature)
    gaps, costs = [], []
    for b in range(replicates):
        cells = {k: (teacher_acc[b, j], student_acc[b, j]) for j, k in enumerate(keys)}
        weights = dict(zip(seeds, seed_counts[b].tolist(), strict=True))
        per_seed = matched_gaps(cells, mode, value, weights)
        gaps.append(weighted_mean([(weights[s], g) for s, g in per_seed.items()]))
        cost = weighted_mean(
            [(w, cells[(*base, s)][0] - cells[mode, value, s][0]) for s, w in weights.items() if (*base, s) in cells]
        )
        if cost is not None:
            costs.append(cost)
    return {
        "method": "paired bootstrap over problems and seeds",
        "problems": n,
        "seeds": len(seeds),
        "replicates": replicates,
        "level": level,
        "gap": percentile_interval(gaps, level),
        "teacher_cost": percentile_interval(costs, level) if costs else None,
    }
