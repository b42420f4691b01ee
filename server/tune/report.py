"""``antidistill tune``'s report: recommendations per tolerance, the plot, the Markdown page.

A recommendation is the largest swept strength whose every smaller swept strength (on that profile)
also stays within the tolerance of strength 0: a sweep that dips, recovers and dips again is not
read as safe in the middle.

The teacher-NLL tolerance is two-sided. Text the teacher finds less likely than its own is strange,
but so is text it finds MORE likely: a completion stuck in a loop repeats what it has just written,
and every repeat is cheap to predict (measured on the embedded default: NLL fell from 0.65 to 0.31
per token as the degenerate share rose from 0.38 to 1). Both are departures from how the teacher
writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLOT_SIZE = (1650, 500)  # pixels of tune.png
PLOT_DPI = 100


@dataclass(frozen=True)
class Tolerance:
    label: str
    measure: str  # a key of a point's figures
    limit: float
    relative: bool  # limit is a fraction of the strength-0 value (else an absolute difference)
    worse: str  # "higher", "lower", or "either" (a departure either way counts)

    def holds(self, point: dict[str, Any], base: dict[str, Any]) -> bool:
        change = point[self.measure] - base[self.measure]
        change = {"higher": change, "lower": -change, "either": abs(change)}[self.worse]
        bound = self.limit * abs(base[self.measure]) if self.relative else self.limit
        return change <= bound + 1e-12


TOLERANCES = (
    Tolerance("≤ 1 point of accuracy lost", "accuracy", 0.01, False, "lower"),
    Tolerance("≤ 5 points of accuracy lost", "accuracy", 0.05, False, "lower"),
    Tolerance("teacher NLL within ± 5 %", "teacher_nll", 0.05, True, "either"),
    Tolerance("teacher NLL within ± 20 %", "teacher_nll", 0.20, True, "either"),
    Tolerance("≤ 5 points more degenerate outputs", "degenerate_rate", 0.05, False, "higher"),
)


def recommend(points: Sequence[dict[str, Any]], tolerances: Sequence[Tolerance] = TOLERANCES) -> list[dict[str, Any]]:
    """Per profile and tolerance, the largest strength within it (see the module docstring)."""
    out = []
    for profile in dict.fromkeys(p["profile"] for p in points):
        sweep = sorted((p for p in points if p["profile"] == profile), key=lambda p: p["strength"])
        base = sweep[0]
        for tol in tolerances:
            best = 0.0
            for p in sweep[1:]:
                if not tol.holds(p, base):
                    break
                best = p["strength"]
            out.append({"profile": profile, "tolerance": tol.label, "max_strength": best})
    return out


def plot(points: Sequence[dict[str, Any]], tiers: Sequence[dict[str, Any]], path: Path) -> Path:
    """Against strength, side by side: teacher NLL and degenerate rate, accuracy (the quality cost),
    and the protection dose (what it buys), the tiers' strengths marked; ``PLOT_SIZE`` pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = (PLOT_SIZE[0] / PLOT_DPI, PLOT_SIZE[1] / PLOT_DPI)
    fig, (left, right, dose) = plt.subplots(1, 3, figsize=size, dpi=PLOT_DPI)
    for profile in dict.fromkeys(p["profile"] for p in points):
        sweep = sorted((p for p in points if p["profile"] == profile), key=lambda p: p["strength"])
        xs = [p["strength"] for p in sweep]
        left.plot(xs, [p["teacher_nll"] for p in sweep], "o-", label=f"{profile}: teacher NLL / token")
        left.plot(xs, [p["degenerate_rate"] for p in sweep], "s--", label=f"{profile}: degenerate share")
        right.plot(xs, [p["accuracy"] for p in sweep], "o-", label=f"{profile}: {sweep[0]['accuracy_kind']}")
        doses = [(x, p["dose"]) for x, p in zip(xs, sweep, strict=True) if p.get("dose") is not None]
        dose.plot([x for x, _ in doses], [d for _, d in doses], "o-", label=f"{profile}: dose")
    dose.axhline(0.0, color="black", linewidth=0.5)
    for ax in (left, right, dose):
        for t in tiers:
            ax.axvline(t["strength"], color="grey", linestyle=":", linewidth=1)
            ax.text(t["strength"], ax.get_ylim()[1], f" {t['tier']}", rotation=90, va="top", fontsize=8, color="grey")
        ax.set_xlabel("strength (λ × Δ scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_title("trace quality")
    right.set_title("accuracy")
    dose.set_title("protection dose (mean Δ of the traces' tokens / s)")
    right.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def markdown(report: dict[str, Any], plot_name: str) -> str:
    """The report page: settings, the table per strength, recommendations, tiers, samples."""
    s = report["settings"]
    lines = [
        "# antidistill tune",
        "",
        f"Command: `{report['command']}`  ",
        f"Teacher `{s['model']}`, proxy `{s['proxy']}`, {s['prompts']} prompts from `{s['prompts_file']}`; "
        f"temperature {s['temperature']}, top-p {s['top_p']}, max {s['max_tokens']} tokens, seed {s['seed']}. "
        f"Sampling time {report['sampling_seconds']:.0f} s over {len(report['points'])} strengths; this run "
        f"{report['seconds']:.0f} s (points kept from an earlier run with the same inputs are not resampled).",
        "",
        f"![strength sweep]({plot_name})",
        "",
        "| profile | strength | λ | accuracy | teacher NLL / token | degenerate | mean tokens | dose "
        "| proxy share of time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in report["points"]:
        lines.append(
            f"| {p['profile']} | {p['strength']:g} | {p['lambda']:.4g} | {p['accuracy']:.3f} | {p['teacher_nll']:.3f} "
            f"| {p['degenerate_rate']:.3f} | {p['mean_tokens']:.1f} | {_dose(p)} | {p['proxy_share']:.2f} |"
        )
    kinds = sorted({p["accuracy_kind"] for p in report["points"]})
    lines += [
        "",
        f"Accuracy is {' / '.join(kinds)}. Teacher NLL is the unprotected teacher's mean negative log-likelihood "
        "of the emitted tokens (higher: stranger text); degenerate: looping (≥ half the 4-grams repeat) or, with "
        "reference answers, no final answer. Dose: the mean Δ of the completions' own tokens along the full g, "
        "over the Δ scale: to first order, how fast training on these traces raises the proxy's held-out loss "
        "(what antidistillation buys; strength 0 is plain sampling at this temperature). "
        "Proxy share: 1 − (time per token at strength 0) / (time per token).",
        "",
        "## Recommendation",
        "",
        "| profile | tolerance (vs strength 0) | strength ≤ |",
        "| --- | --- | ---: |",
        *(f"| {r['profile']} | {r['tolerance']} | {r['max_strength']:g} |" for r in report["recommendations"]),
        "",
        f"With {s['prompts']} prompts one prompt is {100 / s['prompts']:.1f} points of accuracy: read small "
        "differences as noise, and sweep more prompts before relying on a tight tolerance.",
    ]
    hopeless = sorted({p["profile"] for p in report["points"] if p["strength"] == 0 and p["accuracy"] == 0})
    if hopeless:
        lines += [
            "",
            f"Accuracy at strength 0 is 0 on {', '.join(hopeless)}: the teacher does not solve these prompts, so "
            "the accuracy tolerances say nothing here; judge by trace quality.",
        ]
    if report["tiers"]:
        lines += ["", "## Tiers", "", "| tier | profile | strength |", "| --- | --- | ---: |"]
        lines += [f"| {t['tier']} | {t['profile']} | {t['strength']:.4g} |" for t in report["tiers"]]
    lines += ["", "## Samples", ""]
    for i, sample in enumerate(report["samples"]):
        lines += [f"### Prompt {i + 1}", "", "> " + sample["prompt"].replace("\n", " ")[:300], ""]
        for out in sample["outputs"]:
            text = out["text"].strip().replace("\n", " ")
            lines.append(f"- **{out['profile']} strength {out['strength']:g}:** {text}")
        lines.append("")
    return "\n".join(lines)


def _dose(point: dict[str, Any]) -> str:
    return "–" if point.get("dose") is None else f"{point['dose']:.3f}"
