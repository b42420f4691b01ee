"""`antidistill serve` stops before vLLM starts, with one line naming the problem."""

from __future__ import annotations

import shutil

import pytest
import yaml
from antidistill.server.cli import main

from tests.vllm_setup import build_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("cli-models"))


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["serve", *args])
    return code, capsys.readouterr().err.strip()


def test_startup_errors_are_one_line(models, tmp_path, capsys):
    good = ["--proxy", str(models.proxy), "--gradient", f"math={models.gradients['math']}"]
    tiers = tmp_path / "tiers.yaml"
    cases = []
    tiers.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 1, "profile": "code"}}}))
    cases.append(([*good, "--tiers", str(tiers)], "tiers.free.profile: 'code' is not a loaded --gradient profile"))
    high = tmp_path / "high.yaml"
    high.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 1, "max_lambda": 99}}}))
    cases.append(([*good, "--tiers", str(high)], "tiers.free.max_lambda 99 exceeds --max-lambda 50"))
    cases.append(([*good, "--tiers", str(tmp_path / "none.yaml")], "cannot read"))
    cases.append((good, "--tiers FILE is required"))
    cases.append(
        (["--proxy", str(tmp_path), "--gradient", f"math={models.gradients['math']}"], "config.json: not found")
    )
    cases.append((["--proxy", str(models.proxy), "--gradient", "math"], "expected NAME=PATH"))
    corrupt = tmp_path / "g.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage")
    cases.append((["--proxy", str(models.proxy), "--gradient", f"math={corrupt}"], "cannot read safetensors"))
    cases.append(
        (
            ["--proxy", str(models.teacher), "--gradient", f"math={models.gradients['math']}"],
            "computed for proxy config",
        )
    )
    for args, needle in cases:
        code, err = run(capsys, *args)
        assert code == 1 and needle in err and err.count("\n") == 0, (args, err)


def test_bad_checkpoints_and_tiers_are_one_line(models, tmp_path, capsys):
    """A missing or corrupt teacher, proxy or gradient, or a bad tiers file: one line, exit 1, no vLLM."""
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 1}}}))
    gradient = ["--gradient", f"math={models.gradients['math']}"]
    good = ["--proxy", str(models.proxy), *gradient, "--tiers", str(tiers)]
    bad_json = shutil.copytree(models.teacher, tmp_path / "bad-json")
    (bad_json / "config.json").write_text("{not json")
    bad_weights = shutil.copytree(models.teacher, tmp_path / "bad-weights")
    (bad_weights / "model.safetensors").write_bytes(b"\x10\x00garbage")
    no_weights = shutil.copytree(models.teacher, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    bad_proxy = shutil.copytree(models.proxy, tmp_path / "bad-proxy")
    (bad_proxy / "model.safetensors").write_bytes(b"\x10\x00garbage")
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("tiers: [\n  free\n")
    negative = tmp_path / "negative.yaml"
    negative.write_text("tiers: {free: {lambda: -1}}\n")
    cases = [
        ([*good, "--model", str(tmp_path / "missing")], "directory not found"),
        ([*good, "--model", str(bad_json)], "invalid JSON"),
        ([*good, f"--model={bad_weights}"], "cannot read safetensors"),
        ([*good, "--model", str(no_weights)], "no weight files"),
        (["--proxy", str(bad_proxy), *gradient, "--tiers", str(tiers)], "--proxy"),
        (["--proxy", str(models.proxy), "--gradient", f"math={tmp_path / 'none.safetensors'}"], "file not found"),
        (["--proxy", str(models.proxy), *gradient, "--tiers", str(syntax)], "invalid YAML"),
        (["--proxy", str(models.proxy), *gradient, "--tiers", str(negative)], "tiers.free.lambda"),
    ]
    for args, needle in cases:
        code, err = run(capsys, *args)
        assert code == 1 and needle in err and err.count("\n") == 0, (args, err)


def test_capacities_that_cannot_agree_stop_startup(models, tmp_path, capsys, monkeypatch):
    """Both KV capacities fixed by the operator and too small a pool, or a pool that cannot follow one
    max-length prompt: one line, exit 1, before vLLM starts (nothing listens, no engine)."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # kept out of this process's environment
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 1}}}))
    good = ["--proxy", str(models.proxy), "--gradient", f"math={models.gradients['math']}", "--tiers", str(tiers)]
    teacher = ["--model", str(models.teacher), "--max-model-len", "256", "--block-size", "32"]
    cases = [
        (["--proxy-token-budget", "1000", "--num-gpu-blocks-override", "40"], "cannot hold what --num-gpu-blocks"),
        (["--proxy-token-budget", "200"], "cannot follow even one teacher block"),
        (["--max-body-bytes", "10"], "--max-body-bytes 10"),
    ]
    for extra, needle in cases:
        code, err = run(capsys, *good, *teacher, *extra)
        assert code == 1 and needle in err and err.count("\n") == 0, (extra, err)


def test_raw_logprobs_mode_with_a_protected_tier_that_returns_logprobs_stops_startup(
    models, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 1, "max_logprobs": 5}}}))
    args = ["--proxy", str(models.proxy), "--gradient", f"math={models.gradients['math']}", "--tiers", str(tiers)]
    teacher = ["--model", str(models.teacher), "--max-model-len", "256", "--block-size", "32"]
    code, err = run(capsys, *args, *teacher, "--logprobs-mode", "raw_logprobs")
    assert code == 1 and "raw teacher's logprobs" in err and err.count("\n") == 0, err
