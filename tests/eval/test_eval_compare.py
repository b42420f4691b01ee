"""The proxy-origin comparison on constructed run directories: budget fractions resolved per run,
shared seeds only, paired gaps of accuracy and held-out NLL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from antidistill.benchmarks.distillation import compare
from antidistill.benchmarks.distillation.config import load_eval_config


def row(mode: str, value: float, seed: int, teacher: float, student: float, nll: float) -> dict:
    curve = [{"step": 0, "train_loss": None, "heldout": 3.0}, {"step": 10, "train_loss": 0.2, "heldout": nll}]
    return dict(
        mode=mode,
        value=value,
        seed=seed,
        teacher_accuracy=teacher,
        student_accuracy=student,
        n_test=100,
        mechanism={"student": curve},
    )


def make_run(root: Path, origin: str, b_budget: float, seeds: range, ad_student: float, ad_nll: float) -> Path:
    raw = load_eval_config("micro").model_dump(mode="json", exclude_none=True)
    raw["proxy"] = {"origin": origin} if origin == "student_base" else {**raw["proxy"], "origin": origin}
    raw["grid"]["antidistillation"] = ["0.5*budget", "budget"]
    raw["grid"]["key_points"] = ["antidistillation@0.5*budget", "antidistillation@budget"]
    rows = []
    for seed in seeds:
        rows += [row("temperature", 0.8, seed, 0.9, 0.6, 0.10), row("temperature", 1.5, seed, 0.7, 0.4, 0.30)]
        rows.append(row("antidistillation", b_budget / 2, seed, 0.9, 0.6, 0.10))  # no effect at half the budget
        rows.append(row("antidistillation", b_budget, seed, 0.85, ad_student + 0.01 * seed, ad_nll))
    run = root / origin
    (run / "report").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(raw))
    (run / "sweep.json").write_text(json.dumps({"b_budget": b_budget}))
    (run / "gradient.json").write_text(json.dumps({"scale": 10.0}))
    (run / "report" / "registry.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run


def test_runs_are_compared_at_the_same_budget_fraction_on_shared_seeds(tmp_path, capsys):
    prior = make_run(tmp_path, "student_prior", 0.1, range(3), ad_student=0.55, ad_nll=0.20)
    oracle = make_run(tmp_path, "student_base", 0.04, range(2), ad_student=0.40, ad_nll=0.35)
    rows = compare.compare([compare.load_run(prior), compare.load_run(oracle)])
    assert [(r["origin"], r["point"], r["b"]) for r in rows] == [
        ("student_prior", "0.5*budget", 0.05),
        ("student_prior", "budget", 0.1),
        ("student_base", "0.5*budget", 0.02),
        ("student_base", "budget", 0.04),
    ]
    assert all(r["seeds"] == [0, 1] for r in rows)  # seed 2 is missing from the oracle run
    by = {(r["origin"], r["point"]): r for r in rows}
    # temperature at teacher 0.85 on each seed's curve: student 0.55, held-out NLL 0.15
    assert by["student_prior", "budget"]["gap"]["mean"] == pytest.approx(0.55 - 0.555)
    assert by["student_base", "budget"]["gap"]["mean"] == pytest.approx(0.55 - 0.405)
    assert by["student_base", "budget"]["heldout_nll_rise"]["mean"] == pytest.approx(0.35 - 0.15)
    assert by["student_prior", "0.5*budget"]["gap"]["mean"] == pytest.approx(0.0)
    assert by["student_prior", "0.5*budget"]["gap"]["half_width"] == pytest.approx(0.0)
    assert by["student_prior", "budget"]["gap"]["interval"]["method"] == "t"  # no per-problem correctness
    assert by["student_base", "budget"]["teacher_cost"]["mean"] == pytest.approx(0.9 - 0.85)
    assert by["student_prior", "budget"]["proxy_heldout_nll_rise"] == {"mean": None, "half_width": None}
    compare.main([str(prior), str(oracle), "--json", str(tmp_path / "rows.json")])
    table = capsys.readouterr().out
    assert "| student_base | 10 | 0.04 | budget | 0.04 | 2 | 85.0 | +5.0 ± 0.0 | +14.5 ± " in table
    assert json.loads((tmp_path / "rows.json").read_text())[3]["b"] == 0.04


def test_an_unfinished_run_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match=r"not a finished run .*nowhere"):
        compare.main([str(tmp_path / "nowhere")])
