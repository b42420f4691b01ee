"""Compare finished evaluation runs that differ in their proxy (``proxy.origin``) on the seeds they share.

``python -m antidistill.benchmarks.distillation.compare RUN_DIR... [--json PATH]``

Each run places its AD strengths by its own sweep (``0.5*budget``, ``budget``), so the runs are
compared point by point at the same *fraction of their budget*, on the seeds every run has: the
paired accuracy gap (temperature student at the point's mean teacher accuracy minus the AD student)
and the teacher cost on the test split, both with the interval paired.py gives (a bootstrap over
problems and seeds where per-problem correctness was recorded, else t over seeds), and the same
pairing for the student's final NLL on clean held-out teacher traces (AD minus temperature:
positive when the AD traces teach the student less of the teacher's distribution, the paper's
mechanism; t over seeds).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import Any

from antidistill.benchmarks.distillation.config import EvalConfig, budget_fraction, point_name, resolved_strength
from antidistill.benchmarks.distillation.paired import estimate, paired_point
from antidistill.benchmarks.distillation.run_dir import read_jsonl
from antidistill.benchmarks.distillation.stats import paired_gaps, t_interval


def final_heldout_nll(row: dict[str, Any], model: str = "student") -> float | None:
    """The model's (student's or proxy's) NLL on clean held-out teacher traces after its fine-tuning
    on the row's traces (None: not recorded)."""
    curve = (row.get("mechanism") or {}).get(model)
    return curve[-1]["heldout"] if curve else None


def load_run(run_dir: Path) -> dict[str, Any]:
    """What the comparison reads from a finished run directory."""
    cfg = EvalConfig.model_validate_json((run_dir / "config.json").read_text())
    sweep_path = run_dir / "sweep.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.exists() else None
    rows = read_jsonl(run_dir / "report" / "registry.jsonl")
    scale = json.loads((run_dir / "gradient.json").read_text())["scale"]
    return {"dir": str(run_dir), "cfg": cfg, "sweep": sweep, "rows": rows, "scale": scale}


def budget_points(cfg: EvalConfig, b_budget: float | None) -> dict[str, float]:
    """The AD key points named as budget fractions (``0.5*budget`` → its b in this run)."""
    if b_budget is None:
        return {}
    return {
        v: resolved_strength(v, b_budget)
        for v in cfg.grid.antidistillation
        if budget_fraction(v) is not None and point_name("antidistillation", v) in cfg.grid.key_points
    }


def interval(values: list[float]) -> dict[str, float | None]:
    """Mean and 95% t half-width (None for no value; half-width None for one)."""
    mean, half = t_interval(values) if len(values) >= 2 else (values[0] if values else None, None)
    return {"mean": mean, "half_width": half}


def ad_rows(rows: list[dict[str, Any]], b: float) -> list[dict[str, Any]]:
    return [row for row in rows if row["mode"] == "antidistillation" and row["value"] == b]


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, budget-fraction key point), on the seeds all runs share at those points."""
    per_run = [budget_points(r["cfg"], r["sweep"] and r["sweep"]["b_budget"]) for r in runs]
    fractions = sorted(set.intersection(*(set(p) for p in per_run)), key=budget_fraction)
    seed_sets = [
        {row["seed"] for row in ad_rows(r["rows"], points[f])}
        for r, points in zip(runs, per_run, strict=True)
        for f in fractions
    ]
    seeds = set.intersection(*seed_sets) if seed_sets else set()
    out = []
    for r, points in zip(runs, per_run, strict=True):
        shared = [row for row in r["rows"] if row["seed"] in seeds]
        for fraction in fractions:
            b = points[fraction]
            acc = paired_point(shared, "antidistillation", b, r["cfg"].sampling.temperature)
            nll = paired_gaps(shared, "antidistillation", b, final_heldout_nll)
            proxy_nll = paired_gaps(shared, "antidistillation", b, partial(final_heldout_nll, model="proxy"))
            out.append(
                {
                    "run": r["dir"],
                    "origin": r["cfg"].proxy.origin,
                    "scale": r["scale"],
                    "b_budget": r["sweep"]["b_budget"],
                    "point": fraction,
                    "b": b,
                    "seeds": sorted(acc["per_seed"]),
                    "teacher": acc["teacher"],
                    "gap": {k: acc[k] for k in ("mean", "half_width", "interval")},
                    "teacher_cost": {k: acc["teacher_cost"][k] for k in ("mean", "half_width", "interval")},
                    "bootstrap": acc["bootstrap"],
                    "heldout_nll_rise": interval([-v for v in nll.values()]),
                    "proxy_heldout_nll_rise": interval([-v for v in proxy_nll.values()]),
                }
            )
    return out


def _pm(stat: dict[str, Any], scale: float, digits: int) -> str:
    """Mean ± t half-width, or mean [low, high] where a bootstrap interval was drawn."""
    if stat["mean"] is None:
        return "-"
    if stat.get("interval"):
        return estimate(stat, scale, digits)
    half = "" if stat["half_width"] is None else f" ± {scale * stat['half_width']:.{digits}f}"
    return f"{scale * stat['mean']:+.{digits}f}{half}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| proxy origin | Δ scale | budget b | point | b | seeds | teacher acc (%) | teacher cost (pts) "
        "| paired gap (pts) | student held-out NLL rise | proxy held-out NLL rise |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['origin']} | {r['scale']:.3g} | {r['b_budget']:g} | {r['point']} | {r['b']:g} | {len(r['seeds'])} "
            f"| {100 * r['teacher']:.1f} | {_pm(r['teacher_cost'], 100, 1)} | {_pm(r['gap'], 100, 1)} "
            f"| {_pm(r['heldout_nll_rise'], 1, 3)} | {_pm(r['proxy_heldout_nll_rise'], 1, 3)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+", help="finished `antidistill eval --out` directories")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    missing = [d for d in args.run_dirs if not (d / "report" / "registry.jsonl").exists()]
    if missing:
        raise SystemExit(f"not a finished run (no report/registry.jsonl): {', '.join(map(str, missing))}")
    rows = compare([load_run(d) for d in args.run_dirs])
    if not rows:
        raise SystemExit("the runs share no AD key point named as a budget fraction (e.g. antidistillation@budget)")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
