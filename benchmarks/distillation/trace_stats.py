"""What a grid point's sampling did to the traces of a ``chain_sum`` run: style mix and slips.

AD can only hurt a student through what it changes in the traces, so the report shows these figures
next to the accuracies: ``python -m antidistill.benchmarks.distillation.trace_stats RUN_DIR [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from antidistill.benchmarks.distillation.run_dir import read_jsonl

SLIP = re.compile(r"(-?\d+), no, (-?\d+)")
STYLE_NAMES = ("=", "is", "Start at")


def style_of(completion: str) -> str:
    """Which of tasks.STYLES a completion is written in (``?`` when none)."""
    if completion.startswith("Start at"):
        return "Start at"
    first = completion.split("\n", 1)[0]
    if " is " in first:
        return "is"
    return "=" if " = " in first else "?"


def chain_trace_stats(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Style shares, slips per step, and how far slipped values are from the right ones.

    A slip within 2 of the right value is ``near``; anything else (in the training data: the other
    operation, e.g. ``5 - 3 = 8``) is ``far``.
    """
    styles: Counter[str] = Counter()
    steps = slips = near = 0
    for row in rows:
        styles[style_of(row["completion"])] += 1
        steps += row["prompt"].count(" + ") + row["prompt"].count(" - ")
        for wrong, right in SLIP.findall(row["completion"]):
            slips += 1
            near += abs(int(wrong) - int(right)) <= 2
    n = sum(styles.values())
    return {
        "traces": n,
        "style_mix": {s: round(styles[s] / n, 3) for s in (*STYLE_NAMES, "?") if styles[s]},
        "slips_per_step": round(slips / max(steps, 1), 4),
        "far_slip_share": round((slips - near) / slips, 3) if slips else None,
    }


def run_stats(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``chain_trace_stats`` of every traces/<run>.jsonl in an evaluation run directory."""
    return {p.stem: chain_trace_stats(read_jsonl(p)) for p in sorted((run_dir / "traces").glob("*.jsonl"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="an `antidistill eval --out` directory")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    stats = run_stats(args.run_dir)
    if not stats:
        raise SystemExit(f"{args.run_dir}: no traces/*.jsonl (has the traces stage run?)")
    print(f"{'run':<28} {'style mix (= / is / Start at)':<32} {'slips/step':>10} {'far slips':>9}")
    for run, s in stats.items():
        mix = " / ".join(f"{s['style_mix'].get(k, 0):.2f}" for k in STYLE_NAMES)
        far = "-" if s["far_slip_share"] is None else f"{s['far_slip_share']:.2f}"
        print(f"{run:<28} {mix:<32} {s['slips_per_step']:>10.3f} {far:>9}")
    if args.json:
        args.json.write_text(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
