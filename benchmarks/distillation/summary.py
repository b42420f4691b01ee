"""Registry → per-point statistics, the trade-off plot, and the verdict on the target.

Target (the product's claim, after the paper's Figure 3): at ≤ 2 points of teacher-accuracy loss
relative to plain sampling at the AD temperature, the antidistillation student is ≥ 10 points below
the temperature-sampling student AT THE SAME TEACHER ACCURACY (read off the temperature curve by
linear interpolation). The verdict is read on the *paired* gaps of the key points (per seed, against
that seed's own temperature curve: every mode at a seed shares its random stream), with ≥ 5 paired
seeds; the unpaired reading over per-point means (≥ 3 seeds) is reported beside it. Intervals: over
seeds, a 95% Student-t interval of the mean; a single-seed point gets the 95% Wilson interval of its
test accuracy instead."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from antidistill.benchmarks.distillation.config import MODES, TEACHER_LOSS_ALLOWED, EvalConfig, point_name

TARGET_GAP = 0.10
MIN_SEEDS = 3  # seeds the deciding AD point needs before the unpaired reading can count the target met
PAIRED_MIN_SEEDS = 5  # paired seeds the deciding key point needs before the verdict can count the target met
# two-sided 95% Student-t quantiles by degrees of freedom (more seeds: normal approximation)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


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
    return mean, T95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))


def mean_ci(values: Sequence[float], n_test: int) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], wilson_half_width(values[0], n_test)
    return t_interval(values)


def welch_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) − mean(b) and the half-width of its 95% Welch interval (degrees of freedom rounded
    down, so the interval errs wide). The seed-to-seed spread of students is what decides whether a
    gap between two points is real, so the report states it for the key points."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Welch interval needs at least two seeds on each side")
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    if va + vb == 0:
        return ma - mb, 0.0
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return ma - mb, T95.get(max(int(df), 1), 1.96) * math.sqrt(va + vb)


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


def student_accuracy(row: dict[str, Any]) -> float | None:
    return row["student_accuracy"]


def paired_gaps(
    results: Sequence[dict[str, Any]],
    mode: str,
    value: float,
    metric: Callable[[dict[str, Any]], float | None] = student_accuracy,
) -> dict[int, float]:
    """Per seed: ``metric`` of the temperature student at this point's teacher accuracy (interpolated
    on that seed's own temperature curve) minus this point's. Every mode at a seed draws the same
    random stream (pipeline.request_seed), so the seed-to-seed noise the two share cancels here,
    where an unpaired (Welch) difference carries it twice. Seeds lacking a temperature curve, and
    rows whose metric is None, are left out."""
    curves: dict[int, list[tuple[float, float]]] = {}
    for r in results:
        if r["mode"] == "temperature" and metric(r) is not None:
            curves.setdefault(r["seed"], []).append((r["teacher_accuracy"], metric(r)))
    return {
        r["seed"]: interpolate(curves[r["seed"]], r["teacher_accuracy"]) - metric(r)
        for r in results
        if r["mode"] == mode and r["value"] == value and r["seed"] in curves and metric(r) is not None
    }


def paired_by_key(results: Sequence[dict[str, Any]], key_points: Sequence[str]) -> dict[str, dict[str, Any]]:
    """For each non-temperature key point: its per-seed paired gaps, their mean and 95% t half-width
    (None under two paired seeds)."""
    out = {}
    for key in key_points:
        mode, _, raw = key.partition("@")
        if mode != "temperature":
            gaps = paired_gaps(results, mode, float(raw))
            mean, half = t_interval(list(gaps.values())) if len(gaps) >= 2 else (None, None)
            out[key] = {"per_seed": gaps, "mean": mean, "half_width": half}
    return out


def paired_lines(paired: dict[str, dict[str, Any]]) -> list[str]:
    """One report line per key point with ≥ 2 paired seeds."""
    return [
        f"- {key}: {100 * p['mean']:+.1f} ± {100 * p['half_width']:.1f} pts over {len(p['per_seed'])} paired seeds"
        for key, p in paired.items()
        if p["mean"] is not None
    ]


def paired_verdict(
    paired: dict[str, dict[str, Any]], stats: Sequence[PointStat], base_temperature: float
) -> dict[str, Any]:
    """The verdict on the paired gaps: the AD key point within the teacher budget with the largest
    mean paired gap, and whether it reaches the target on ≥ PAIRED_MIN_SEEDS paired seeds."""
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


def verdict_line(decided: dict[str, Any]) -> str:
    """The paired verdict in one clause."""
    if decided["point"] is None:
        return decided["reason"]
    return (
        f"{decided['point']}: paired gap {100 * decided['gap']:+.1f} ± {100 * decided['half_width']:.1f} pts over "
        f"{decided['seeds']} seeds at teacher {100 * decided['teacher']:.1f}% "
        f"(baseline {100 * decided['baseline_teacher']:.1f}%); "
        f"needs ≥ {100 * TARGET_GAP:.0f} pts on ≥ {PAIRED_MIN_SEEDS} paired seeds"
    )


def aggregate(results: Sequence[dict[str, Any]]) -> list[PointStat]:
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


def interpolate(curve: Sequence[tuple[float, float]], x: float) -> float:
    """y at x on the piecewise-linear curve through ``curve`` (sorted by x; clamped at the ends)."""
    pts = sorted(curve)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def verdict(stats: Sequence[PointStat], base_temperature: float) -> dict[str, Any]:
    """The best AD and permutation points within the allowed teacher loss, against temperature."""
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


def plot(
    stats: Sequence[PointStat],
    undistilled: float,
    title: str,
    path: Path,
    paired: dict[str, dict[str, Any]] | None = None,
) -> None:
    """The trade-off (student vs teacher accuracy, unpaired intervals) and, when key points have
    paired seeds, a second panel with their paired gaps: the intervals the verdict is read on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps = {k: p for k, p in (paired or {}).items() if p["mean"] is not None}
    if gaps:
        fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=120, width_ratios=[3, 2])
        plot_paired_gaps(gap_ax, gaps)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    styles = {"temperature": ("tab:blue", "o"), "antidistillation": ("tab:red", "s"), "permutation": ("tab:gray", "^")}
    for mode in MODES:
        pts = sorted((s for s in stats if s.mode == mode), key=lambda s: s.teacher)
        if not pts:
            continue
        color, marker = styles[mode]
        ax.errorbar(
            [100 * s.teacher for s in pts],
            [100 * s.student for s in pts],
            xerr=[100 * s.teacher_ci for s in pts],
            yerr=[100 * s.student_ci for s in pts],
            color=color,
            marker=marker,
            capsize=3,
            label=mode,
        )
        for s in pts:
            ax.annotate(
                f"{s.value:g}",
                (100 * s.teacher, 100 * s.student),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
                color=color,
            )
    ax.axhline(100 * undistilled, color="black", linestyle="--", linewidth=1, label="undistilled student")
    ax.set_xlabel("teacher accuracy (%)")
    ax.set_ylabel("distilled student accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_paired_gaps(ax: Any, gaps: dict[str, dict[str, Any]]) -> None:
    """Paired gap per key point with its 95% t interval, against zero and the target."""
    keys = list(gaps)
    colors = ["tab:red" if k.startswith("antidistillation@") else "tab:gray" for k in keys]
    for i, key in enumerate(keys):
        ax.errorbar(
            [i],
            [100 * gaps[key]["mean"]],
            yerr=[100 * gaps[key]["half_width"]],
            color=colors[i],
            marker="s",
            capsize=4,
        )
        ax.annotate(
            f"n={len(gaps[key]['per_seed'])}",
            (i, 100 * gaps[key]["mean"]),
            fontsize=7,
            xytext=(5, 0),
            textcoords="offset points",
        )
    ax.axhline(0, color="black", linewidth=1)
    ax.axhline(100 * TARGET_GAP, color="tab:green", linestyle="--", linewidth=1, label="target")
    ax.set_xticks(range(len(keys)), keys, rotation=20, ha="right", fontsize=7)
    ax.set_xlim(-0.5, len(keys) - 0.5)
    ax.set_ylabel("temperature student − point's student (pts, same seed)")
    ax.set_title("paired gaps at matched teacher accuracy (95% t)", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)


def table(stats: Sequence[PointStat]) -> str:
    rows = ["| point | seeds | teacher acc (%) | student acc (%) |", "| --- | ---: | ---: | ---: |"]
    for s in sorted(stats, key=lambda s: (MODES.index(s.mode), s.value)):
        rows.append(
            f"| {point_name(s.mode, s.value)} | {s.seeds} | {100 * s.teacher:.1f} ± {100 * s.teacher_ci:.1f} "
            f"| {100 * s.student:.1f} ± {100 * s.student_ci:.1f} |"
        )
    return "\n".join(rows)


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
    """``holdout``: the traces and completion tokens g was computed on (None: not recorded);
    ``quality``: ``trace_quality_by_point``; ``sweep``: the sweep stage's sweep.json, if it ran."""
    stats = aggregate(results)
    paired = paired_by_key(results, cfg.grid.key_points)
    unpaired = verdict(stats, cfg.sampling.temperature)
    decided = paired_verdict(paired, stats, cfg.sampling.temperature)
    v = {
        **unpaired,
        "unpaired_target_met": unpaired["target_met"],
        "paired": decided,
        "target_met": decided["target_met"],
    }
    plot(stats, undistilled, f"{cfg.name}: teacher vs distilled student", out / "tradeoff.png", paired)
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
        f"Target met: **{v['target_met']}** ({verdict_line(decided)})",
        "",
        f"Unpaired reading (per-point means, ≥ {MIN_SEEDS} seeds): target met **{v['unpaired_target_met']}**.",
    ]
    ad = v.get("antidistillation")
    if ad:
        lines.append(
            f"Best AD point within {100 * TEACHER_LOSS_ALLOWED:.0f} pts of teacher loss: b = {ad['value']:g}, "
            f"student {100 * ad['student']:.1f}% vs temperature student "
            f"{100 * ad['temperature_student_at_same_teacher']:.1f}% "
            f"at the same teacher accuracy (gap {100 * ad['gap']:.1f} pts; target {100 * TARGET_GAP:.0f})."
        )
        if ad["seeds"] < MIN_SEEDS:
            lines.append(
                f"That point has {ad['seeds']} seed(s); the target counts only with ≥ {MIN_SEEDS}: "
                f"add `antidistillation@{ad['value']:g}` to grid.key_points and rerun."
            )
    baseline = point_name("temperature", cfg.sampling.temperature)
    differences = key_point_differences(results, cfg.grid.key_points, baseline)
    if differences:
        lines += ["", "Student accuracy at the key points minus the baseline's (95% Welch interval over seeds):", ""]
        lines += differences
    if paired_lines(paired):
        lines += [
            "",
            "Paired gap at the key points: temperature student at the same teacher accuracy (same seed) "
            "minus the point's student, 95% t interval over seeds:",
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


QUALITY_FIGURES = ("teacher_nll", "degenerate_rate", "mean_tokens")


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


def plot_mechanism(mechanism: dict[str, dict[str, list[dict[str, float]]]], path: Path) -> None:
    """Panels over fine-tuning steps, one line per point: the student's training loss, its held-out
    NLL, and (when recorded) the proxy's held-out NLL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("student", "train_loss", "student: training loss"), ("student", "heldout", "student: held-out NLL")]
    if any(by_model.get("proxy") for by_model in mechanism.values()):
        panels.append(("proxy", "heldout", "proxy: held-out NLL"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), dpi=100)
    for ax, (model, key, title) in zip(axes, panels, strict=True):
        for name, by_model in mechanism.items():
            curve = [c for c in by_model.get(model, []) if c[key] is not None]
            if curve:
                ax.plot([c["step"] for c in curve], [c[key] for c in curve], "o-", label=name, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"
