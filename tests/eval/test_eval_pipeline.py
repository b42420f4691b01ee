"""The distillation-attack evaluation end to end on the ``micro`` config: real training, real vLLM
engine with our processor, resumable stages; plus the stage records and the proxy stage in isolation."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from antidistill.benchmarks.distillation import prepare
from antidistill.benchmarks.distillation.budget import budget_strength
from antidistill.benchmarks.distillation.cli import main as eval_main
from antidistill.benchmarks.distillation.config import EvalConfig, load_eval_config, point_name
from antidistill.benchmarks.distillation.pipeline import Pipeline
from antidistill.benchmarks.distillation.run_dir import read_jsonl, run_name
from antidistill.benchmarks.distillation.sampling import request_seed

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
    real_gradient = prepare.make_gradient

    def killed(run: Pipeline) -> dict:
        real_gradient(run)  # the stage's outputs are on disk…
        raise KeyboardInterrupt  # …but the process dies before its sentinel

    first = Pipeline(cfg, root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare, "make_gradient", killed)
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
    prepare.make_data(pipe)
    prepare.make_tokenizer(pipe)
    prepare.make_student_base(pipe)
    return pipe, prepare.make_proxy(pipe)


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
    expected = len(prepare.student_prior(pipe)) if origin == "student_prior" else pipe.cfg.task.train
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
