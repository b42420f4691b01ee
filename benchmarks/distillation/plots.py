"""The report's figures (matplotlib, Agg: no display needed): the trade-off between teacher and
distilled-student accuracy, the paired gaps the verdict is read on, and the mechanism curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from antidistill.benchmarks.distillation.config import MODES
from antidistill.benchmarks.distillation.stats import PointStat
from antidistill.benchmarks.distillation.verdict import TARGET_GAP


def plot_tradeoff(
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
    """Paired gap per key point with the interval the verdict reads (paired.py: bootstrap over
    problems and seeds, or t over seeds), against zero and the target."""
    keys = list(gaps)
    colors = ["tab:red" if k.startswith("antidistillation@") else "tab:gray" for k in keys]
    methods = sorted({gaps[k]["interval"]["method"] for k in keys})
    for i, key in enumerate(keys):
        mean, interval = gaps[key]["mean"], gaps[key]["interval"]
        ax.errorbar(
            [i],
            [100 * mean],
            yerr=[[100 * (mean - interval["low"])], [100 * (interval["high"] - mean)]],
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
    ax.set_title(f"paired gaps at the mean teacher accuracy (95% {' / '.join(methods)})", fontsize=9)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)


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
