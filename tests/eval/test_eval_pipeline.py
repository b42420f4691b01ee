"""The distillation-attack evaluation end to end on the ``micro`` config: real training, real vLLM
engine with our processor, resumable stages; plus its statistics and training pieces in isolation."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from functools import partial
from pathlib import Path

import pytest
import safetensors.torch
import torch
from antidistill.benchmarks.distillation import summary
from antidistill.benchmarks.distillation.budget import budget_strength
from antidistill.benchmarks.distillation.cli import main as eval_main
from antidistill.benchmarks.distillation.config import (
    CONFIG_DIR,
    MODES,
    ConfigError,
    EvalConfig,
    load_eval_config,
    point_name,
)
from antidistill.benchmarks.distillation.models import PRETRAINED, Shape, scratch_model, train_tokenizer
from antidistill.benchmarks.distillation.pipeline import Pipeline, read_jsonl, request_seed, run_name
from antidistill.benchmarks.distillation.tasks import GENERATORS
from antidistill.benchmarks.distillation.training import TrainSpec, collate, completion_nll, fine_tune
from antidistill.proxy_worker.tools.traces import TokenizedTrace

from tests.helpers import engine_fixture

EARLY = ["data", "tokenizer", "teacher", "student_base", "proxy", "holdout"]


@dataclasses.dataclass(frozen=True)
class KilledRun:
    """The ``micro`` run killed inside its gradient stage, and its directory as the kill left it."""

    cfg: EvalConfig
    root: Path
    executed: list[str]
    gradient_on_disk: bool
    gradient_sentinel_on_disk: bool
    model_mtimes: dict[Path, int]  # every file under models/, when the run died


@dataclasses.dataclass(frozen=True)
class ResumedRun:
    """The killed run run again to its end in the same directory."""

    killed: KilledRun
    cfg: EvalConfig  # the config as the run went on with it: the grid placed by its sweep
    executed: list[str]
    model_mtimes: dict[Path, int]  # the same files, after the resumed run
    report: Path
    registry: list[dict]  # the report's registry.jsonl
    runs: list[str]  # the grid's run names, in grid order


def model_mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (root / "models").rglob("*") if p.is_file()}


def run_killed_in_the_gradient_stage(cfg: EvalConfig, root: Path) -> KilledRun:
    real_gradient = Pipeline.make_gradient

    def killed(self: Pipeline) -> dict:
        real_gradient(self)  # the stage's outputs are on disk…
        raise KeyboardInterrupt  # …but the process dies before its sentinel

    first = Pipeline(cfg, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Pipeline, "make_gradient", killed)
        with pytest.raises(KeyboardInterrupt):
            first.run()
    on_disk = (root / "gradient.safetensors").is_file()
    return KilledRun(cfg, root, first.executed, on_disk, first.sentinel("gradient").exists(), model_mtimes(root))


@engine_fixture(scope="module", slow=True)
def resumed_run(tmp_path_factory) -> ResumedRun:
    """The ``micro`` pipeline killed in its gradient stage, then run again to its end (the traces stage
    samples through the vLLM engine with our processor)."""
    killed = run_killed_in_the_gradient_stage(load_eval_config("micro"), tmp_path_factory.mktemp("micro") / "run")
    second = Pipeline(killed.cfg, killed.root)
    report = second.run()
    runs = [run_name(*p) for p in second.cfg.grid.points()]
    registry = read_jsonl(report / "registry.jsonl")
    return ResumedRun(killed, second.cfg, second.executed, model_mtimes(killed.root), report, registry, runs)


def test_a_killed_stage_leaves_its_outputs_but_no_sentinel(resumed_run):
    killed = resumed_run.killed
    assert killed.executed == EARLY
    assert killed.gradient_on_disk and not killed.gradient_sentinel_on_disk


def test_a_rerun_resumes_at_the_killed_stage_without_retraining_the_models(resumed_run):
    runs = resumed_run.runs
    assert resumed_run.executed == ["gradient", "sweep", "traces", *[f"student/{r}" for r in runs], "report"]
    before = resumed_run.killed.model_mtimes
    assert {p: resumed_run.model_mtimes[p] for p in before} == before  # teacher, proxy not retrained


def test_the_sweep_places_the_budget_point_before_any_trace_is_sampled(resumed_run):
    """The grid's ``budget`` point is the largest swept b within the teacher budget, measured on the
    distill prompts against λ = 0 on the same random stream; the report shows the sweep."""
    cfg, root = resumed_run.killed.cfg, resumed_run.killed.root
    swept = json.loads((root / "sweep.json").read_text())
    assert [p["b"] for p in swept["points"]] == [0.0, *cfg.sweep.values]
    assert swept["problems"] == cfg.sweep.problems and swept["budget"] == cfg.sweep.budget
    scale = json.loads((root / "gradient.json").read_text())["scale"]
    assert swept["scale"] == scale and all(p["lambda"] == pytest.approx(p["b"] / scale) for p in swept["points"])
    accuracy = [p["teacher_accuracy"] for p in swept["points"]]
    assert swept["b_budget"] == budget_strength(cfg.sweep.values, accuracy[1:], accuracy[0], cfg.sweep.budget) > 0
    assert resumed_run.cfg.grid.antidistillation == [swept["b_budget"]]
    assert resumed_run.cfg.grid.key_points == [point_name("antidistillation", swept["b_budget"])]
    ad_runs = [r for r in resumed_run.registry if r["mode"] == "antidistillation"]
    assert {r["value"] for r in ad_runs} == {swept["b_budget"]} and len(ad_runs) == cfg.grid.key_seeds
    page = (resumed_run.report / "summary.md").read_text()
    assert f"the budget's b is **{swept['b_budget']:g}**" in page
    assert json.loads((resumed_run.report / "summary.json").read_text())["sweep"] == swept


def test_the_resumed_run_reports_every_grid_run(resumed_run):
    cfg, root, report, runs = resumed_run.cfg, resumed_run.killed.root, resumed_run.report, resumed_run.runs
    grad = json.loads((root / "gradient.json").read_text())
    assert grad["scale"] > 0 and grad["epsilon"] in cfg.sampling.epsilons
    assert [run_name(r["mode"], r["value"], r["seed"]) for r in resumed_run.registry] == runs
    for row in resumed_run.registry:
        assert 0 <= row["student_accuracy"] <= 1 and 0 <= row["teacher_accuracy"] <= 1
        assert row["n_traces"] == cfg.task.distill and row["n_test"] == cfg.task.test
        if row["mode"] == "temperature":
            assert row["lambda"] == 0 and row["temperature"] == row["value"]
        else:
            assert row["lambda"] == pytest.approx(row["value"] / grad["scale"])
            assert row["temperature"] == cfg.sampling.temperature
            assert row["ad_mode"] == ("ad" if row["mode"] == "antidistillation" else "permutation")
    traces = read_jsonl(root / "traces" / f"{runs[0]}.jsonl")
    assert len(traces) == cfg.task.distill and any(t["completion"] for t in traces)
    assert (report / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((report / "summary.json").read_text())
    assert "verdict" in payload and "paired" in payload
    holdout = read_jsonl(root / "holdout.jsonl")
    assert payload["holdout"]["traces"] == grad["traces"] == len(holdout) == cfg.task.holdout
    assert payload["holdout"]["completion_tokens"] == grad["trace_tokens"] > 0
    page = (report / "summary.md").read_text()
    assert "Target met" in page and f"Gradient g: {cfg.task.holdout} holdout traces" in page and "greedy" in page
    meta = json.loads((root / "traces" / f"{runs[0]}.json").read_text())
    quality = meta["quality"]
    assert quality["completions"] == cfg.task.distill and quality["teacher_nll"] > 0
    assert 0 <= quality["degenerate_rate"] <= 1 and quality["mean_tokens"] > 0
    assert meta["samples"] == [t["completion"] for t in traces[:3]], "samples are the first distill problems"
    assert set(payload["trace_quality"]) == {point_name(m, v) for m, v, _ in cfg.grid.points()}
    assert "| point | teacher NLL / token | degenerate |" in page and "Sample traces" in page
    for row in resumed_run.registry:
        for model in ("student", "proxy"):
            curve = row["mechanism"][model]
            steps = [c["step"] for c in curve]
            assert steps[0] == 0 and steps == sorted(set(steps)) and len(steps) >= 2, (model, curve)
            assert all(c["heldout"] > 0 for c in curve), (model, curve)
    assert "| point | student held-out NLL |" in page and (report / "mechanism.png").is_file()


def test_a_finished_run_reruns_nothing(resumed_run):
    third = Pipeline(resumed_run.killed.cfg, resumed_run.killed.root)
    third.run()
    assert third.executed == []


def test_students_in_worker_processes_rerun_the_same_stages_with_the_same_results(resumed_run, tmp_path):
    """The same students, two at a time in worker processes."""
    cfg, root, runs = resumed_run.killed.cfg, resumed_run.killed.root, resumed_run.runs
    parallel = tmp_path / "parallel"
    students_and_report = shutil.ignore_patterns("results", "report", "student_*#*.done", "report.done")
    shutil.copytree(root, parallel, ignore=students_and_report)
    fourth = Pipeline(cfg.model_copy(update={"workers": 2}), parallel)
    fourth.run()
    assert sorted(fourth.executed) == sorted([*(f"student/{r}" for r in runs), "report"])
    assert read_jsonl(parallel / "report" / "registry.jsonl") == resumed_run.registry


def test_a_new_grid_point_samples_and_distils_only_itself(resumed_run, tmp_path):
    """The other runs' traces and students are kept (on a copy of the finished run's directory)."""
    cfg, runs = resumed_run.killed.cfg, resumed_run.runs
    assert cfg.grid.permutation == [2]
    root = shutil.copytree(resumed_run.killed.root, tmp_path / "run")
    traces_before = {p: p.read_bytes() for p in (root / "traces").glob("*.jsonl")}
    grown = cfg.model_copy(update={"grid": cfg.grid.model_copy(update={"permutation": [2.0, 4.0]})})
    fifth = Pipeline(grown, root)
    fifth.run()
    assert fifth.executed == ["traces", "student/permutation@4#0", "report"]
    assert {p: p.read_bytes() for p in traces_before} == traces_before
    assert json.loads(fifth.sentinel("traces").read_text())["kept"] == len(runs)
    assert len(read_jsonl(root / "report" / "registry.jsonl")) == len(runs) + 1


def test_every_mode_at_a_seed_draws_the_same_random_stream(resumed_run, tmp_path):
    """Common random numbers: antidistillation at b = 0 is temperature sampling at the same τ, so with
    the same (seed, split, problem) seeds its traces are the temperature run's, token for token —
    while the AD run's second seed draws another stream."""
    cfg = resumed_run.cfg
    tau = cfg.sampling.temperature
    assert tau in cfg.grid.temperature
    root = shutil.copytree(resumed_run.killed.root, tmp_path / "run")
    grid = cfg.grid.model_copy(update={"antidistillation": [0.0, *cfg.grid.antidistillation]})
    Pipeline(cfg.model_copy(update={"grid": grid}), root).run()
    traces = root / "traces"
    zero, temperature = (
        read_jsonl(traces / f"{run_name(m, v, 0)}.jsonl") for m, v in [("antidistillation", 0.0), ("temperature", tau)]
    )
    assert [r["completion"] for r in zero] == [r["completion"] for r in temperature]
    assert json.loads((traces / f"{run_name('antidistillation', 0.0, 0)}.json").read_text())["lambda"] == 0
    key = cfg.grid.key_points[0].split("@")
    second = read_jsonl(traces / f"{run_name(key[0], float(key[1]), 1)}.jsonl")
    first = read_jsonl(traces / f"{run_name(key[0], float(key[1]), 0)}.jsonl")
    assert [r["completion"] for r in first] != [r["completion"] for r in second]


def test_request_seeds_depend_on_seed_split_and_problem_only():
    seeds = {
        (s, split, i): request_seed(0, s, split, i)
        for s in range(3)
        for split in ("distill", "test")
        for i in range(50)
    }
    assert len(set(seeds.values())) == len(seeds)  # distinct streams for distinct (seed, split, problem)
    assert request_seed(1, 0, "test", 3) != request_seed(0, 0, "test", 3)  # the config's seed moves them all


def test_a_config_edit_reruns_the_stages_that_read_it_and_those_after(tmp_path):
    pipe = Pipeline(load_eval_config("micro"), tmp_path)
    calls: list[str] = []
    out = tmp_path / "partial.txt"

    def body(name: str):
        return lambda: calls.append(name) or {}

    def chain(a_reads: list, b_reads: list) -> None:
        fp = pipe.stage("a", [], body("a"), "", a_reads)
        pipe.stage("b", [out], body("b"), fp, b_reads)

    chain([1], ["x"])
    assert calls == ["a", "b"]
    chain([1], ["x"])
    assert calls == ["a", "b"]
    out.write_text("left by a killed attempt")
    chain([1], ["y"])
    assert calls == ["a", "b", "b"] and not out.exists()
    chain([2], ["y"])
    assert calls == ["a", "b", "b", "a", "b"]


def built_proxy(tmp_path: Path, origin: str) -> tuple[Pipeline, dict]:
    """The ``micro`` run's stages up to the proxy, with the proxy of ``origin``."""
    raw = load_eval_config("micro").model_dump(mode="json", exclude_none=True)
    raw["proxy"] = {"origin": origin} if origin == "student_base" else {**raw["proxy"], "origin": origin}
    pipe = Pipeline(EvalConfig.model_validate(raw), tmp_path / origin)
    pipe.make_data()
    pipe.make_tokenizer()
    pipe.make_student_base()
    return pipe, pipe.make_proxy()


def test_the_oracle_proxy_is_the_student_base_bit_for_bit(tmp_path):
    pipe, info = built_proxy(tmp_path, "student_base")
    proxy = safetensors.torch.load_file(str(pipe.path("models", "proxy", "model.safetensors")))
    base = safetensors.torch.load_file(str(pipe.path("models", "student_base", "model.safetensors")))
    assert info["origin"] == "student_base" and proxy.keys() == base.keys()
    assert all(torch.equal(proxy[k], base[k]) for k in base)


@pytest.mark.parametrize("origin", ["student_prior", "teacher_task"])
def test_a_trained_proxy_learns_from_its_origins_data(tmp_path, origin):
    """student_prior trains on exactly the student's prior problems; teacher_task on the train split."""
    pipe, info = built_proxy(tmp_path, origin)
    expected = len(pipe.student_prior()) if origin == "student_prior" else pipe.cfg.task.train
    assert info["origin"] == origin and info["train_problems"] == expected
    if origin == "student_prior":
        assert expected == len(read_jsonl(pipe.path("data", "student_pretrain.jsonl"))) > 0


def test_the_proxy_stage_reads_what_its_origin_builds_from(tmp_path):
    """A changed prior task retrains a student_prior proxy; a new student base recopies the oracle."""
    raw = load_eval_config("micro").model_dump(mode="json", exclude_none=True)
    prior = Pipeline(EvalConfig.model_validate(raw), tmp_path / "a")
    assert prior.proxy_reads("base-fp")[1] == prior.cfg.student.pretrain_task
    oracle = Pipeline(EvalConfig.model_validate({**raw, "proxy": {"origin": "student_base"}}), tmp_path / "b")
    assert oracle.proxy_reads("base-fp")[1] == "base-fp"
    teacher = Pipeline(
        EvalConfig.model_validate({**raw, "proxy": {**raw["proxy"], "origin": "teacher_task"}}), tmp_path / "c"
    )
    assert teacher.proxy_reads("base-fp")[1] is None


def test_proxy_origins_that_cannot_be_built_are_config_errors():
    raw = load_eval_config("micro").model_dump(mode="json", exclude_none=True)
    with pytest.raises(ValueError, match="origin student_base is the student base itself"):
        EvalConfig.model_validate({**raw, "proxy": {**raw["proxy"], "origin": "student_base"}})
    no_prior = {**raw, "student": {k: v for k, v in raw["student"].items() if k != "pretrain_task"}}
    with pytest.raises(ValueError, match=r"student_prior trains on student\.pretrain_task"):
        EvalConfig.model_validate(no_prior)


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, capsys):
    import fcntl

    (tmp_path / ".lock").touch()
    with (tmp_path / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert eval_main(["micro", "--out", str(tmp_path)]) == 2
    assert "is being used by another run" in capsys.readouterr().out


def test_eval_cli_names_an_unknown_config(capsys):
    assert eval_main(["no-such-config"]) == 2
    assert "no-such-config: no such config (packaged: micro" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_packaged_configs_are_valid(name):
    """A packaged config that only fails hours into a GPU run (or at its first stage) is a broken product."""
    cfg = load_eval_config(name)
    assert cfg.name == name
    assert cfg.task.kind in GENERATORS
    points = (cfg.grid.resolve(0.1) if cfg.grid.needs_sweep else cfg.grid).points()
    modes = {mode for mode, _, _ in points}
    # the verdict needs the temperature curve and AD; comparison variants may leave out the control
    assert {"temperature", "antidistillation"} <= modes <= set(MODES)
    assert "permutation" in modes or cfg.name.startswith(("toy-slips-", "smollm2-tiny-task"))
    assert len(points) == len(set(points))
    # a checkpoint named by a bare word (not a directory or an org/name hub id) must be one the
    # pipeline can build offline: a typo would otherwise surface only when its stage starts
    for spec in (cfg.teacher, cfg.proxy, cfg.student):
        assert spec.path is None or "/" in spec.path or spec.path in {"teacher", *PRETRAINED}


def test_a_bad_config_names_its_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(re.sub(r"key_seeds: \d+", "key_seeds: 0", (CONFIG_DIR / "toy.yaml").read_text()))
    with pytest.raises(ConfigError, match=r"bad.yaml: grid.key_seeds: .*greater than or equal to 1"):
        load_eval_config(str(bad))


def test_the_budget_strength_is_the_largest_b_within_the_budget_with_every_smaller_b():
    values = [0.05, 0.1, 0.2, 0.5]
    assert budget_strength(values, [0.70, 0.69, 0.68, 0.50], 0.70, 0.02) == 0.2  # 2.0 points: inside
    assert budget_strength(values, [0.70, 0.66, 0.69, 0.50], 0.70, 0.02) == 0.05  # a dip ends it
    assert budget_strength(values, [0.60, 0.60, 0.60, 0.60], 0.70, 0.02) == 0.0  # none within
    assert budget_strength(values, [0.71, 0.70, 0.70, 0.69], 0.70, 0.02) == 0.5  # all within


def test_budget_fractions_resolve_to_b_values_and_rename_their_key_points():
    raw = load_eval_config("micro").model_dump(mode="json", exclude_none=True)
    raw["grid"] |= {
        "antidistillation": ["0.25*budget", "0.5*budget", "budget", 0.03],
        "permutation": ["budget"],
        "key_points": ["antidistillation@budget", "permutation@budget", "temperature@0.8"],
    }
    grid = EvalConfig.model_validate(raw).grid
    with pytest.raises(ValueError, match="resolve it with the sweep"):
        grid.points()
    placed = grid.resolve(0.12)
    assert placed.antidistillation == [0.03, 0.06, 0.12]  # 0.25 × 0.12 merged with the explicit 0.03
    assert placed.permutation == [0.12]
    assert placed.key_points == ["antidistillation@0.12", "permutation@0.12", "temperature@0.8"]
    assert not placed.needs_sweep and grid.resolve(0.0737).antidistillation[0] == 0.0184  # 3 significant


def test_budget_fractions_need_a_sweep_and_a_well_formed_name():
    raw = load_eval_config("micro").model_dump(mode="json", exclude_none=True)
    with pytest.raises(ValueError, match="add a sweep section"):
        EvalConfig.model_validate({k: v for k, v in raw.items() if k != "sweep"})
    bad = {**raw, "grid": {**raw["grid"], "antidistillation": ["half*budget"], "key_points": []}}
    with pytest.raises(ValueError, match="'half\\*budget' is neither a number nor"):
        EvalConfig.model_validate(bad)
    with pytest.raises(ValueError, match=r"sweep.problems \(4096\) exceeds task.distill"):
        EvalConfig.model_validate({**raw, "sweep": {"values": [1], "problems": 4096}})
    with pytest.raises(ValueError, match="strictly ascending"):
        EvalConfig.model_validate({**raw, "sweep": {"values": [2, 1]}})


def test_verdict_compares_at_matched_teacher_accuracy():
    stats = [
        summary.PointStat("temperature", 0.8, 3, 0.90, 0.01, 0.60, 0.02),
        summary.PointStat("temperature", 1.5, 1, 0.70, 0.03, 0.40, 0.03),
        summary.PointStat("antidistillation", 1, 3, 0.89, 0.01, 0.45, 0.02),
        summary.PointStat("antidistillation", 4, 1, 0.80, 0.03, 0.10, 0.03),
        summary.PointStat("permutation", 1, 3, 0.89, 0.01, 0.58, 0.02),
    ]
    v = summary.verdict(stats, base_temperature=0.8)
    ad = v["antidistillation"]
    # b = 4 loses 10 teacher points: not eligible; b = 1 is compared with the temperature curve at 0.89
    assert ad["value"] == 1
    assert ad["temperature_student_at_same_teacher"] == pytest.approx(0.59)
    assert ad["gap"] == pytest.approx(0.14) and v["target_met"]
    assert v["permutation"]["gap"] == pytest.approx(0.01)
    weaker = [
        s if s.mode != "antidistillation" else summary.PointStat(s.mode, s.value, 3, s.teacher, 0, 0.55, 0)
        for s in stats
    ]
    assert not summary.verdict(weaker, base_temperature=0.8)["target_met"]
    lucky = [s if s.mode != "antidistillation" else dataclasses.replace(s, seeds=1) for s in stats]
    v = summary.verdict(lucky, base_temperature=0.8)
    assert v["antidistillation"]["gap"] == pytest.approx(0.14) and not v["target_met"]  # one seed is not enough


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
    gaps = summary.paired_gaps(rows, "antidistillation", 2.0)
    # temperature at teacher 0.85 on each seed's curve: 0.55 + luck; minus 0.40 + luck + 0.01·seed
    assert gaps == pytest.approx({0: 0.15, 1: 0.14, 2: 0.13})
    mean, half = summary.t_interval(list(gaps.values()))
    assert mean == pytest.approx(0.14) and half == pytest.approx(4.303 * 0.01 / 3**0.5)
    _, welch_half = summary.welch_difference(
        [r["student_accuracy"] for r in rows if r["mode"] == "temperature" and r["value"] == 0.8],
        [r["student_accuracy"] for r in rows if r["mode"] == "antidistillation"],
    )
    assert welch_half > 5 * half  # the shared luck is noise to the unpaired difference
    rows.append(run_row("antidistillation", 2.0, 3, 0.85, 0.30))  # seed 3 has no temperature curve
    assert set(summary.paired_gaps(rows, "antidistillation", 2.0)) == {0, 1, 2}
    paired = summary.paired_by_key(rows, ["temperature@0.8", "antidistillation@2"])
    assert set(paired) == {"antidistillation@2"} and paired["antidistillation@2"]["mean"] == pytest.approx(0.14)
    [line] = summary.paired_lines(paired)
    assert line.startswith("- antidistillation@2: +14.0 ± 2.5 pts over 3 paired seeds")


def test_paired_verdict_needs_the_gap_on_five_paired_seeds_within_the_budget():
    rows = []
    for seed in range(5):
        rows += [run_row("temperature", 0.8, seed, 0.90, 0.60), run_row("temperature", 1.5, seed, 0.70, 0.40)]
        rows.append(run_row("antidistillation", 1.0, seed, 0.89, 0.47 + 0.01 * (seed % 2)))  # gap ≈ 12 pts
        rows.append(run_row("antidistillation", 4.0, seed, 0.80, 0.10))  # 10 teacher points lost: not eligible
    keys = ["temperature@0.8", "antidistillation@1", "antidistillation@4"]
    v = summary.paired_verdict(summary.paired_by_key(rows, keys), summary.aggregate(rows), base_temperature=0.8)
    assert v["point"] == "antidistillation@1" and v["seeds"] == 5 and v["target_met"]
    assert v["gap"] == pytest.approx(0.59 - 0.474)  # the curve at teacher 0.89 is 0.59 on every seed
    assert "+11.6 ±" in summary.verdict_line(v) and "over 5 seeds" in summary.verdict_line(v)
    four = [r for r in rows if r["seed"] < 4]
    v = summary.paired_verdict(summary.paired_by_key(four, keys), summary.aggregate(four), base_temperature=0.8)
    assert v["gap"] == pytest.approx(0.115) and not v["target_met"]  # the same gap on 4 seeds does not count
    v = summary.paired_verdict(summary.paired_by_key(rows, keys[:1]), summary.aggregate(rows), base_temperature=0.8)
    assert v["point"] is None and not v["target_met"]


def test_busy_seconds_is_the_union_of_intervals():
    assert summary.busy_seconds([]) == 0
    assert summary.busy_seconds([(0, 10), (5, 12), (20, 21)]) == 13  # two overlapping, one apart
    assert summary.busy_seconds([(0, 10), (2, 3)]) == 10  # one inside another
    lines = summary.timing_lines({"teacher": 100, "student/a#0": 50, "student/b#0": 50}, students_wall=55)
    assert "| student/* (2 runs, 100 s of work) | 55 |" in lines and lines[-1] == "| **total** | **155** |"


def test_intervals():
    assert summary.wilson_half_width(0.5, 100) == pytest.approx(0.0962, abs=1e-3)
    mean, half = summary.mean_ci([0.4, 0.5, 0.6], n_test=100)
    assert mean == pytest.approx(0.5) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert summary.interpolate([(0.7, 0.4), (0.9, 0.6)], 0.8) == pytest.approx(0.5)
    assert summary.interpolate([(0.7, 0.4), (0.9, 0.6)], 0.95) == 0.6


def test_welch_difference_of_key_points():
    # Welch: se = sqrt(0.01/3 + 0.01/3 / 3) = 0.0667, df = 3.2; the exact t quantile at 3.2 df lies
    # between those at 4 (2.776) and 3 (3.182) df, and rounding df down picks the wider one
    diff, half = summary.welch_difference([0.6, 0.7, 0.8], [0.5, 0.5, 0.6])
    assert diff == pytest.approx(1 / 6) and half == pytest.approx(3.182 * math.sqrt(0.01 / 3 + 0.01 / 9))
    assert summary.welch_difference([0.5, 0.5], [0.4, 0.4]) == (pytest.approx(0.1), 0.0)
    with pytest.raises(ValueError, match="two seeds"):
        summary.welch_difference([0.5], [0.4, 0.6])
    rows = [{"mode": "temperature", "value": 0.8, "student_accuracy": a} for a in (0.5, 0.5, 0.6)]
    rows += [{"mode": "antidistillation", "value": 0.05, "student_accuracy": a} for a in (0.6, 0.7, 0.8)]
    rows += [{"mode": "permutation", "value": 0.05, "student_accuracy": 0.7}]  # one seed: no line
    lines = summary.key_point_differences(
        rows, ["temperature@0.8", "antidistillation@0.05", "permutation@0.05"], "temperature@0.8"
    )
    assert lines == [f"- antidistillation@0.05 − temperature@0.8: +16.7 ± {100 * half:.1f} pts"]


def test_collate_masks_prompt_and_padding():
    batch = collate([TokenizedTrace([5, 6, 7, 8], 2), TokenizedTrace([9, 10, 11], 1)], pad_id=0)
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, 11, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fine_tuning_learns_a_completion(method):
    tok = train_tokenizer(["1 + 2 =\n3\n#### 3", "4 - 1 =\n3\n#### 3"] * 10, vocab_size=280)
    model = scratch_model(Shape(hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, intermediate=128), tok, 0)
    data = [TokenizedTrace(tok("1 + 2 =\n")["input_ids"] + tok("#### 3")["input_ids"] + [tok.eos_token_id], 5)] * 8
    before = model(**collate(data, tok.pad_token_id)).loss.item()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    spec = TrainSpec(steps=40, batch_size=8, lr=1e-2, method=method, lora_r=8, lora_alpha=16)
    model, info = fine_tune(model, data, spec, tok.pad_token_id, seed=0)
    after = model(**collate(data, tok.pad_token_id)).loss.item()
    assert after < before - 1.0 and info["steps"] == 40
    assert type(model).__name__ == "LlamaForCausalLM"  # LoRA adapters merged back into a plain model
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)


def test_completion_nll_is_the_token_weighted_completion_loss():
    tok = train_tokenizer(["1 + 2 =\n3\n#### 3", "4 - 1 =\n3\n#### 3"] * 10, vocab_size=280)
    model = scratch_model(Shape(hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, intermediate=128), tok, 0)
    data = [TokenizedTrace(list(range(5, 14)), 3), TokenizedTrace(list(range(20, 25)), 2)]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for t in data:  # one trace at a time, no padding: the plain definition
            logp = torch.log_softmax(model(torch.tensor([t.ids])).logits[0], dim=-1)
            total -= sum(float(logp[j - 1, t.ids[j]]) for j in range(t.prompt_len, len(t.ids)))
            tokens += len(t.ids) - t.prompt_len
    assert completion_nll(model, data, tok.pad_token_id) == pytest.approx(total / tokens, rel=1e-5)


def test_fine_tuning_with_a_monitor_records_the_curve():
    """Step 0 and each checkpoint: the mean training loss since the last one and the monitor's value;
    training on the held-out data itself makes its NLL fall."""
    tok = train_tokenizer(["1 + 2 =\n3\n#### 3", "4 - 1 =\n3\n#### 3"] * 10, vocab_size=280)
    model = scratch_model(Shape(hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, intermediate=128), tok, 0)
    data = [TokenizedTrace(tok("1 + 2 =\n")["input_ids"] + tok("#### 3")["input_ids"] + [tok.eos_token_id], 5)] * 8
    monitor = partial(completion_nll, examples=data, pad_id=tok.pad_token_id)
    spec = TrainSpec(steps=20, batch_size=8, lr=1e-2)
    _, info = fine_tune(model, data, spec, tok.pad_token_id, 0, monitor=monitor, checkpoints=4)
    curve = info["curve"]
    assert [c["step"] for c in curve] == [0, 5, 10, 15, 20] and curve[0]["train_loss"] is None
    assert curve[-1]["heldout"] < curve[0]["heldout"] - 1.0 and all(c["train_loss"] > 0 for c in curve[1:])
