"""The evaluation's configs: packaged ones valid, errors that name their field, proxy origins that
cannot be built, and the grid's budget fractions placed by the sweep's budget strength."""

from __future__ import annotations

import re

import pytest
from antidistill.benchmarks.distillation.budget import budget_strength
from antidistill.benchmarks.distillation.config import CONFIG_DIR, MODES, ConfigError, EvalConfig, load_eval_config
from antidistill.benchmarks.distillation.models import PRETRAINED
from antidistill.benchmarks.distillation.tasks import GENERATORS


def test_proxy_origins_that_cannot_be_built_are_config_errors():
    raw = load_eval_config("micro").model_dump(mode="json", exclude_none=True)
    with pytest.raises(ValueError, match="origin student_base is the student base itself"):
        EvalConfig.model_validate({**raw, "proxy": {**raw["proxy"], "origin": "student_base"}})
    no_prior = {**raw, "student": {k: v for k, v in raw["student"].items() if k != "pretrain_task"}}
    with pytest.raises(ValueError, match=r"student_prior trains on student\.pretrain_task"):
        EvalConfig.model_validate(no_prior)


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
    assert grid.verdict_point == "antidistillation@budget" and placed.verdict_point == "antidistillation@0.12"
    assert not placed.needs_sweep and grid.resolve(0.0737).antidistillation[0] == 0.0184  # 3 significant


def test_the_verdict_point_is_named_before_the_run_among_the_ad_key_points():
    """Each packaged config names the one point its verdict is read at; a name that is not an AD key
    point is refused at load time, not after the run."""
    for path in CONFIG_DIR.glob("*.yaml"):
        grid = load_eval_config(path.stem).grid
        assert grid.verdict_point in grid.key_points and grid.verdict_point.startswith("antidistillation@")
    raw = load_eval_config("micro").model_dump(mode="json", exclude_none=True)
    for bad in ("permutation@2", "antidistillation@0.5*budget"):
        with pytest.raises(ValueError, match="must be an antidistillation point among key_points"):
            EvalConfig.model_validate({**raw, "grid": {**raw["grid"], "verdict_point": bad}})


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
