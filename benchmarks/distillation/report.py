"""The report stage: a finished grid's registry, ``summary.json``, the figures (plots.py) and
``summary.md`` — the per-point table, the verdict at the config's verdict point (verdict.py) and the
readings beside it: Welch and paired differences at the key points (paired.py), each with its
teacher cost on the test split, the sweep, trace quality, the mechanism, stage times."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from antidistill.benchmarks.distillation.config import MODES, TEACHER_LOSS_ALLOWED, EvalConfig, point_name
from antidistill.benchmarks.distillation.paired import estimate, paired_by_key
from antidistill.benchmarks.distillation.plots import plot_mechanism, plot_tradeoff
from antidistill.benchmarks.distillation.run_dir import RunDir, run_name, write_jsonl
from antidistill.benchmarks.distillation.stats import (
    PointStat,
    aggregate,
    mechanism_by_point,
    trace_quality_by_point,
    welch_difference,
)
from antidistill.benchmarks.distillation.verdict import (
    MIN_SEEDS,
    PAIRED_MIN_SEEDS,
    TARGET_GAP,
    paired_verdict,
    unpaired_verdict,
)


def make_report(run: RunDir) -> dict[str, Any]:
    """The report stage's body: the registry of every grid run's result, then ``write_report``
    with the stage records' times, g's holdout, the trace quality and the sweep."""
    points = run.cfg.grid.points()
    results = [json.loads(run.path("results", f"{run_name(*p)}.json").read_text()) for p in points]
    base = run.record("student_base")
    report = run.path("report")
    report.mkdir()
    write_jsonl(report / "registry.jsonl", results)
    names = ["data", "tokenizer", "teacher", "proxy", "holdout", "gradient", "traces", "student_base"]
    names += ["sweep"] if run.cfg.sweep is not None else []
    names += [f"student/{run_name(*p)}" for p in points]
    records = {name: run.record(name) for name in names}
    timings = {name: s["seconds"] for name, s in records.items()}
    students = [s for n, s in records.items() if n.startswith("student/")]
    # records written before "finished" was recorded count as having run one after another
    spans = [(s["finished"] - s["seconds"], s["finished"]) for s in students if "finished" in s]
    wall = busy_seconds(spans)
    wall += sum(s["seconds"] for s in students if "finished" not in s)
    gradient = records["gradient"]
    holdout = (gradient.get("traces"), gradient.get("trace_tokens"))
    traces = {p: json.loads(run.path("traces", f"{run_name(*p)}.json").read_text()) for p in points}
    quality = trace_quality_by_point(traces)
    swept = run.swept() if run.cfg.sweep is not None else None
    verdict = write_report(run.cfg, results, base["student_accuracy"], timings, wall, report, holdout, quality, swept)
    return {"target_met": verdict["target_met"]}


def write_report(
    cfg: EvalConfig,
    results: Sequence[dict[str, Any]],
    undistilled: float,
    timings: dict[str, float],
    students_wall: float,
    out: Path,
    holdout: tuple[int | None, int | None] = (None, None),
    quality: dict[str, dict[str, Any]] | None = None,
    sweep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``summary.json``, the figures and ``summary.md`` into ``out``; return the verdict.
    ``holdout``: the traces and completion tokens g was computed on (None: not recorded);
    ``quality``: ``trace_quality_by_point``; ``sweep``: the sweep stage's sweep.json, if it ran."""
    stats = aggregate(results)
    paired = paired_by_key(results, cfg.grid.key_points, cfg.sampling.temperature)
    unpaired = unpaired_verdict(stats, cfg.sampling.temperature, cfg.grid.verdict_point)
    decided = paired_verdict(paired, cfg.grid.verdict_point)
    v = {
        **unpaired,
        "unpaired_target_met": unpaired["target_met"],
        "paired": decided,
        "target_met": decided["target_met"],
    }
    plot_tradeoff(stats, undistilled, f"{cfg.name}: teacher vs distilled student", out / "tradeoff.png", paired)
    payload = {
        "points": [asdict(s) for s in stats],
        "undistilled_student": undistilled,
        "verdict": v,
        "paired": paired,
        "holdout": {"traces": holdout[0], "completion_tokens": holdout[1]},
        "trace_quality": quality or {},
        "sweep": sweep,
    }
    times = {"stage_seconds": timings, "students_wall_seconds": students_wall}
    (out / "summary.json").write_text(json.dumps({**payload, **times}, indent=2))
    lines = [
        f"# Distillation attack: {cfg.name}",
        "",
        f"Undistilled student: {100 * undistilled:.1f}%. Values: τ for temperature, b = λ·scale otherwise "
        f"(AD points sampled at τ = {cfg.sampling.temperature:g}). ± = 95% interval.",
        "",
        f"Gradient g: {_count(holdout[0])} holdout traces, {_count(holdout[1])} completion tokens "
        f"(τ = {cfg.sampling.holdout_temperature:g}{', greedy' if cfg.sampling.holdout_temperature == 0 else ''}).",
        *sweep_lines(sweep),
        "",
        table(stats),
        "",
        "![trade-off](tradeoff.png)",
        "",
        f"Target met: **{v['target_met']}**; shown by the intervals: **{decided['target_shown']}** "
        f"({verdict_line(decided)})",
        "",
        f"Unpaired reading (per-point means, ≥ {MIN_SEEDS} seeds): target met **{v['unpaired_target_met']}**.",
    ]
    ad = v.get("antidistillation")
    if ad:
        lines.append(
            f"At the verdict point b = {ad['value']:g}: student {100 * ad['student']:.1f}% vs temperature student "
            f"{100 * ad['temperature_student_at_same_teacher']:.1f}% at the same teacher accuracy "
            f"(gap {100 * ad['gap']:.1f} pts; target {100 * TARGET_GAP:.0f}, within "
            f"{100 * TEACHER_LOSS_ALLOWED:.0f} pts of teacher loss)."
        )
    baseline = point_name("temperature", cfg.sampling.temperature)
    differences = key_point_differences(results, cfg.grid.key_points, baseline)
    if differences:
        lines += ["", "Student accuracy at the key points minus the baseline's (95% Welch interval over seeds):", ""]
        lines += differences
    if paired_lines(paired):
        lines += [
            "",
            "Paired gap at the key points: temperature student at the point's mean teacher accuracy (same seed) "
            "minus the point's student, and the point's teacher cost on the test split (temperature@"
            f"{cfg.sampling.temperature:g} minus the point, same seed); {interval_note(paired)}:",
            "",
        ]
        lines += paired_lines(paired)
    lines += quality_lines(quality or {})
    mechanism = mechanism_by_point(results)
    if mechanism:
        plot_mechanism(mechanism, out / "mechanism.png")
        lines += mechanism_lines(mechanism)
    (out / "mechanism.json").write_text(json.dumps(mechanism, indent=2))
    lines += ["", "Stage times (s):", "", *timing_lines(timings, students_wall)]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return v


def table(stats: Sequence[PointStat]) -> str:
    """The per-point table, in grid mode order."""
    rows = ["| point | seeds | teacher acc (%) | student acc (%) |", "| --- | ---: | ---: | ---: |"]
    for s in sorted(stats, key=lambda s: (MODES.index(s.mode), s.value)):
        rows.append(
            f"| {point_name(s.mode, s.value)} | {s.seeds} | {100 * s.teacher:.1f} ± {100 * s.teacher_ci:.1f} "
            f"| {100 * s.student:.1f} ± {100 * s.student_ci:.1f} |"
        )
    return "\n".join(rows)


def key_point_differences(results: Sequence[dict[str, Any]], key_points: Sequence[str], baseline: str) -> list[str]:
    """One line per key point with ≥ 2 seeds: its student accuracy minus the baseline's, with interval."""
    students: dict[str, list[float]] = {}
    for r in results:
        students.setdefault(point_name(r["mode"], r["value"]), []).append(r["student_accuracy"])
    base = students.get(baseline, [])
    lines = []
    for key in key_points:
        if key != baseline and len(students.get(key, [])) >= 2 and len(base) >= 2:
            diff, half = welch_difference(students[key], base)
            lines.append(f"- {key} − {baseline}: {100 * diff:+.1f} ± {100 * half:.1f} pts")
    return lines


def interval_note(paired: dict[str, dict[str, Any]]) -> str:
    """How the key points' intervals were drawn."""
    boot = next((p["bootstrap"] for p in paired.values() if p["bootstrap"]), None)
    if boot is None:
        return "95% t intervals over seeds (no per-problem correctness recorded)"
    return (
        f"95% intervals by a paired bootstrap over {boot['problems']} test problems and the seeds "
        f"({boot['replicates']} replicates)"
    )


def paired_lines(paired: dict[str, dict[str, Any]]) -> list[str]:
    """One report line per key point with ≥ 2 paired seeds: gap and teacher cost."""
    return [
        f"- {key}: {estimate(p)} pts over {len(p['per_seed'])} paired seeds, at teacher "
        f"{_percent(p['teacher'])} (cost {estimate(p['teacher_cost'])} pts)"
        for key, p in paired.items()
        if p["mean"] is not None
    ]


def verdict_line(decided: dict[str, Any]) -> str:
    """The paired verdict in one clause."""
    if decided["point"] is None:
        return decided["reason"]
    gap = {"mean": decided["gap"], "half_width": decided["half_width"], "interval": decided["interval"]}
    return (
        f"verdict point {decided['point']}: paired gap {estimate(gap)} pts over {decided['seeds']} seeds at "
        f"teacher {_percent(decided['teacher'])} (baseline {_percent(decided['baseline_teacher'])}, cost "
        f"{estimate(decided['teacher_cost'])} pts on the test split); needs ≥ {100 * TARGET_GAP:.0f} pts on "
        f"≥ {PAIRED_MIN_SEEDS} paired seeds within {100 * TEACHER_LOSS_ALLOWED:.0f} pts of teacher cost"
    )


def sweep_lines(sweep: dict[str, Any] | None) -> list[str]:
    """The sweep that placed the grid's budget fractions: teacher accuracy against b, and its choice."""
    if sweep is None:
        return []
    base = sweep["points"][0]["teacher_accuracy"]
    lines = [
        "",
        f"Strength sweep (teacher accuracy on {sweep['problems']} distill prompts at τ = {sweep['temperature']:g}, "
        f"one random stream for every b): the budget's b is **{sweep['b_budget']:g}**, the largest b costing "
        f"≤ {100 * sweep['budget']:g} points, as does every smaller b"
        + ("." if sweep["bracketed"] else " (every swept b was within it: the edge lies further out)."),
        "",
        "| b | λ | teacher acc (%) | loss (pts) |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for p in sweep["points"]:
        acc = p["teacher_accuracy"]
        lines.append(f"| {p['b']:g} | {p['lambda']:.4g} | {100 * acc:.1f} | {100 * (base - acc):.1f} |")
    return lines


def mechanism_lines(mechanism: dict[str, dict[str, list[dict[str, float]]]]) -> list[str]:
    """The mechanism table: per point, the student's (and proxy's) held-out NLL before and after
    fine-tuning on the point's traces, and the final training loss (![mechanism](mechanism.png))."""
    lines = [
        "",
        "Mechanism (the paper's training-vs-held-out check): NLL per token on clean held-out teacher traces "
        "before → after fine-tuning on each point's traces, and the final training loss, means over seeds. AD "
        "works when the held-out NLL rises (or falls less than under temperature sampling) while the training "
        "loss falls; if the proxy's rises and the student's does not, the break is in transfer, not in Δ.",
        "",
        "| point | student held-out NLL | student train loss | proxy held-out NLL |",
        "| --- | --- | ---: | --- |",
    ]
    for name, by_model in mechanism.items():
        student, proxy = by_model.get("student"), by_model.get("proxy")
        cells = []
        for curve in (student, proxy):
            cells.append("-" if not curve else f"{curve[0]['heldout']:.3f} → {curve[-1]['heldout']:.3f}")
        train = "-" if not student or student[-1]["train_loss"] is None else f"{student[-1]['train_loss']:.3f}"
        lines.append(f"| {name} | {cells[0]} | {train} | {cells[1]} |")
    return [*lines, "", "![mechanism](mechanism.png)"]


def quality_lines(quality: dict[str, dict[str, Any]], sample_chars: int = 240) -> list[str]:
    """The trace-quality table and, per point, its sample traces (the same problems at every point)."""
    if not quality:
        return []
    lines = [
        "",
        "Trace quality of the distill traces (what a student trains on and a user reads): the unprotected "
        "teacher's NLL per emitted token, the share of looping or answerless traces, the mean length:",
        "",
        "| point | teacher NLL / token | degenerate | mean tokens | seeds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {name} | {q['teacher_nll']:.3f} | {q['degenerate_rate']:.3f} | {q['mean_tokens']:.1f} | {q['seeds']} |"
        for name, q in quality.items()
    ]
    lines += ["", "Sample traces (first distill problems, lowest seed):", ""]
    for name, q in quality.items():
        shown = " ⏎ ".join(t.strip().replace("\n", " ")[:sample_chars] for t in q["samples"])
        lines.append(f"- **{name}:** {shown}")
    return lines


def busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals: the wall time of stages that ran side by side."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def timing_lines(timings: dict[str, float], students_wall: float) -> list[str]:
    """Stage times as measured when each stage last ran (a resumed run sums earlier attempts' stages);
    the students count by wall time, since with ``workers`` > 1 they run side by side."""
    students = {k: v for k, v in timings.items() if k.startswith("student/")}
    rows = {k: v for k, v in timings.items() if k not in students}
    rows[f"student/* ({len(students)} runs, {sum(students.values()):.0f} s of work)"] = students_wall
    out = ["| stage | seconds |", "| --- | ---: |"]
    out += [f"| {k} | {v:.0f} |" for k, v in rows.items()]
    out.append(f"| **total** | **{sum(rows.values()):.0f}** |")
    return out


def _percent(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.1f}%"


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"
