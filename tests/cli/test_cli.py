"""The `antidistill` command: every sub-command is listed and reached, each loads only what it needs,
and `antidistill serve` stops before vLLM starts, with one line naming the problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from antidistill.benchmarks.tiny.models import CORPUS
from antidistill.benchmarks.tiny.serving import build_models
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.gradient_file import (
    DELTA_SCALE_KEY,
    check_gradient_header,
    load_gradient,
    read_metadata,
    save_gradient,
)
from antidistill.proxy_worker.core.strength import ADD_SCALE
from antidistill.proxy_worker.runtime.settings import PROCESSOR_PATH, PROCESSOR_PATH_V2
from antidistill.server.cli import COMMANDS, main
from antidistill.server.gateway.config import GatewayConfig
from antidistill.server.startup import serve as serve_module
from antidistill.server.startup.flags import serve_parser
from antidistill.server.startup.preflight import StartupError, remote_workers_problem
from antidistill.server.startup.serve import RUNNER_ENV, engine_config, processor_for, with_our_processor


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("cli-models"))


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(["serve", *args])
    return code, capsys.readouterr().err.strip()


def test_help_lists_every_command_on_one_line(capsys):
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, command in COMMANDS.items():
        assert sum(line.split()[:1] == [name] and command.summary in line for line in lines) == 1, (name, lines)
    assert main(["nonsense"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("antidistill: unknown command 'nonsense'") and all(name in err for name in COMMANDS)


def test_keygen_loads_neither_vllm_nor_torch_nor_the_evaluation():
    """Commands are imported when they run: the gateway's CLI has no import-time edge to benchmarks."""
    probe = (
        "import sys; from antidistill.server.cli import main; main(['keygen', '--tier', 'pro']); "
        "print(sorted({m.split('.')[0] if not m.startswith('antidistill.') else '.'.join(m.split('.')[:2]) "
        "for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    key_line, entry_line, loaded = out.splitlines()
    assert key_line.startswith("key (give to the client, shown once): ad-")
    assert json.loads(entry_line.split("- ", 1)[1])["tier"] == "pro"
    for heavy in ("vllm", "torch", "transformers", "antidistill.benchmarks", "peft", "matplotlib"):
        assert repr(heavy) not in loaded, heavy


def test_keygen_entry_names_the_account_and_loads_as_a_key(capsys):
    from antidistill.server.tiers import TiersFile

    assert main(["keygen", "--tier", "pro", "--name", "ci", "--account", "acme"]) == 0
    entry = json.loads(capsys.readouterr().out.splitlines()[1].split("- ", 1)[1])
    assert entry["account"] == "acme" and entry["name"] == "ci"
    spec = TiersFile.model_validate(
        {"tiers": {"pro": {"lambda": 1}}, "keys": [entry], "accounts": {"acme": {"rpm": 5}}}
    )
    assert spec.keys[0].account == "acme"


def test_eval_without_its_extra_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "antidistill.benchmarks.distillation.cli", raising=False)
    assert main(["eval", "toy"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "antidistill eval: peft not installed: pip install 'antidistill[eval]'"
    assert "antidistill.benchmarks.distillation.cli" not in sys.modules


def test_embedded_default_without_reasoning_gym_says_how_to_install_it(capsys, monkeypatch, tmp_path):
    """The demo's holdout traces are the one thing in `serve` that needs the `demo` extra."""
    from antidistill.server.embedded import setup as default_setup

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if not installed

    def traces_not_yet_written(ours, rest):
        return default_setup.generate_holdout(tmp_path, tmp_path / "holdout.jsonl")

    monkeypatch.setattr(default_setup, "embedded_default", traces_not_yet_written)
    code, err = run(capsys, "--embedded-default")
    assert code == 1 and err.endswith("pip install 'antidistill[demo]'") and err.count("\n") == 0, err


def test_gradient_and_calibrate_run_the_offline_tools(models, tmp_path, capsys):
    """`antidistill gradient` writes what the library builds from the same traces; `antidistill
    calibrate` reads it back and recommends an ε."""
    traces = tmp_path / "traces.jsonl"
    records = [{"prompt": s[:20], "completion": s[20:]} for s in CORPUS[0::4][:8]]  # the fixture's "math" traces
    traces.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "g.safetensors"
    assert main(["gradient", "--proxy", str(models.proxy), "--traces", str(traces), "--out", str(out)]) == 0
    cfg = load_config(models.proxy)
    check_gradient_header(out, cfg)
    ours, library = load_gradient(out, cfg), load_gradient(models.gradients["math"], cfg)
    assert ours.keys() == library.keys() and all(ours[k].equal(library[k]) for k in ours)
    report = tmp_path / "calibration.json"
    argv = ["calibrate", "--proxy", str(models.proxy), "--gradient", str(out), "--prompts", str(traces)]
    assert main([*argv, "--num", "2", "--max-tokens", "8", "--dtypes", "float32", "--json", str(report)]) == 0
    assert "recommended epsilon for float32" in capsys.readouterr().out
    assert set(json.loads(report.read_text())["recommended"]) == {"float32"}


def test_processor_paths_name_the_adapters():
    """The import-path strings vLLM is given resolve (as vLLM resolves them) to the adapter classes."""
    from antidistill.proxy_worker.runtime.vllm_v1 import AntidistillationLogitsProcessor
    from antidistill.proxy_worker.runtime.vllm_v2 import AntidistillationLogitsProcessorV2
    from vllm.utils.import_utils import resolve_obj_by_qualname

    assert resolve_obj_by_qualname(PROCESSOR_PATH.replace(":", ".")) is AntidistillationLogitsProcessor
    assert resolve_obj_by_qualname(PROCESSOR_PATH_V2.replace(":", ".")) is AntidistillationLogitsProcessorV2
    assert with_our_processor([]) == [PROCESSOR_PATH]
    assert with_our_processor([PROCESSOR_PATH]) == [PROCESSOR_PATH]


def test_audit_log_defaults_to_stderr_in_one_place():
    """Serving writes no audit file where it runs unless told to: the flag's default is the config's."""
    assert GatewayConfig.audit_log == "-"
    assert serve_parser().parse_args([]).audit_log == GatewayConfig.audit_log


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


def test_a_strength_tier_on_a_gradient_without_a_scale_stops_startup_with_the_fix(models, tmp_path, capsys):
    """A gradient written before Δ scales were stored cannot serve a ``strength:`` tier: one line
    naming the tier, the profile and the command that stores the scale; ``lambda:`` tiers still start."""
    old = tmp_path / "old.safetensors"
    meta = {k: v for k, v in read_metadata(models.gradients["math"]).items() if k != DELTA_SCALE_KEY}
    save_gradient(old, load_gradient(models.gradients["math"], load_config(models.proxy)), meta)
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(yaml.safe_dump({"tiers": {"free": {"strength": 1.0}}}))
    code, err = run(capsys, "--proxy", str(models.proxy), "--gradient", f"math={old}", "--tiers", str(tiers))
    fix = ADD_SCALE.format(proxy=models.proxy, gradient=old)
    assert code == 1 and err.count("\n") == 0, err
    assert "tiers.free" in err and "'math'" in err and fix in err, err


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


@pytest.fixture()
def restored_environ():
    """``antidistill serve`` hands its configuration to vLLM through the environment: undo that."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def vllm_args(models, *extra: str):
    from antidistill.server.startup.vllm_cli import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", str(models.teacher), "--max-model-len", "256", *extra]
    return make_arg_parser(FlexibleArgumentParser()).parse_args(argv)


@pytest.fixture()
def cuda_like(monkeypatch):
    """vLLM's runner decision as on a CUDA node with Triton (V2 unless the env var says 0); the
    values of the env var it saw are recorded."""
    from vllm.config import VllmConfig

    seen: list[str | None] = []

    def use_v2_model_runner(self) -> bool:
        seen.append(os.environ.get(RUNNER_ENV))
        return os.environ.get(RUNNER_ENV) != "0"

    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(use_v2_model_runner))
    monkeypatch.setattr(VllmConfig, "_validate_v2_model_runner", lambda self: None)
    return seen


def test_serve_picks_the_adapter_of_the_runner_on_this_build(models, monkeypatch):
    """The CPU build runs V1 (vLLM's rule: no Triton CPU backend), pinned so the API server and the
    engine agree; forcing V2 here stops start-up with vLLM's own reason, in one line."""
    for env in (None, "0"):
        if env is None:
            monkeypatch.delenv(RUNNER_ENV, raising=False)
        else:
            monkeypatch.setenv(RUNNER_ENV, env)
        assert processor_for(engine_config(vllm_args(models))) == PROCESSOR_PATH, env
        assert os.environ[RUNNER_ENV] == "0"
    monkeypatch.setenv(RUNNER_ENV, "1")
    with pytest.raises(StartupError, match="requires Triton") as exc:
        engine_config(vllm_args(models))
    assert "\n" not in str(exc.value)


def test_the_runner_is_vllms_decision_and_v1_stays_the_default_until_flipped(models, monkeypatch, cuda_like):
    """The adapter follows ``VllmConfig.use_v2_model_runner``; ``V2_RUNNER_BY_DEFAULT`` is the one
    line that lets vLLM's CUDA default (V2) through, and an explicit env var always wins."""
    monkeypatch.delenv(RUNNER_ENV, raising=False)
    assert processor_for(engine_config(vllm_args(models))) == PROCESSOR_PATH
    assert cuda_like[-1] == "0", "until the GPU check passes, an unset env var means V1"
    monkeypatch.setenv(RUNNER_ENV, "1")
    assert processor_for(engine_config(vllm_args(models))) == PROCESSOR_PATH_V2
    monkeypatch.setattr(serve_module, "V2_RUNNER_BY_DEFAULT", True)
    monkeypatch.delenv(RUNNER_ENV, raising=False)
    assert processor_for(engine_config(vllm_args(models))) == PROCESSOR_PATH_V2
    assert cuda_like[-1] is None and os.environ[RUNNER_ENV] == "1"
    monkeypatch.setenv(RUNNER_ENV, "0")
    assert processor_for(engine_config(vllm_args(models))) == PROCESSOR_PATH, "V1 stays selectable"


def test_with_our_processor_refuses_the_other_runners_adapter():
    assert with_our_processor([], PROCESSOR_PATH_V2) == [PROCESSOR_PATH_V2]
    assert with_our_processor([PROCESSOR_PATH_V2], PROCESSOR_PATH_V2) == [PROCESSOR_PATH_V2]
    for listed, ours in [(PROCESSOR_PATH, PROCESSOR_PATH_V2), (PROCESSOR_PATH_V2, PROCESSOR_PATH)]:
        with pytest.raises(StartupError, match="other model runner") as exc:
            with_our_processor([listed], ours)
        assert "\n" not in str(exc.value)


def test_serve_hands_vllm_the_adapter_of_its_runner(models, tmp_path, capsys, monkeypatch, restored_environ, cuda_like):
    """Through the whole command, up to vLLM's server (replaced here): the class matches the runner;
    speculative decoding and the other runner's adapter stop start-up with one line."""
    from vllm.entrypoints.launchers.api_server import entry

    started = []

    async def run_server(args, **_kw):
        started.append(args)

    monkeypatch.setattr(entry, "run_server", run_server)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("ANTIDISTILL_FAILURE_LEDGER", str(tmp_path / "ledger.bin"))
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 1}}}))
    argv = ["--proxy", str(models.proxy), "--gradient", f"math={models.gradients['math']}", "--tiers", str(tiers)]
    argv += ["--model", str(models.teacher), "--max-model-len", "256", "--block-size", "32"]
    for env, expected in [(None, PROCESSOR_PATH), ("1", PROCESSOR_PATH_V2), ("0", PROCESSOR_PATH)]:
        if env is None:
            monkeypatch.delenv(RUNNER_ENV, raising=False)
        else:
            monkeypatch.setenv(RUNNER_ENV, env)
        assert main(["serve", *argv]) == 0, capsys.readouterr().err
        assert started[-1].logits_processors == [expected], env
    monkeypatch.setenv(RUNNER_ENV, "1")
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2})
    for extra, needle in [
        (["--speculative-config", spec], "speculative decoding"),
        (["--logits-processors", PROCESSOR_PATH], "other model runner"),
    ]:
        capsys.readouterr()
        code, err = run(capsys, *argv, *extra)
        *_plan, last = err.splitlines()  # after the KV plan's line: the reason, in one line
        assert code == 1 and last.startswith("antidistill: ") and needle in last, (extra, err)
    assert len(started) == 3


def test_proxy_attention_flag_reaches_the_processor_settings(models):
    """--proxy-attention offers exactly the planner's paths and lands in the settings the worker reads."""
    from antidistill.proxy_worker.core.plan import ATTENTION_PATHS
    from antidistill.server.startup.serve import processor_settings

    parser = serve_parser()
    flag = next(a for a in parser._actions if a.dest == "proxy_attention")
    assert tuple(flag.choices) == ATTENTION_PATHS and flag.default == "reference"
    base = ["--proxy", str(models.proxy), "--gradient", f"math={models.gradients['math']}"]
    ours, _ = parser.parse_known_args([*base, "--proxy-attention", "flex"])
    assert processor_settings(ours).proxy_attention == "flex"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--proxy-attention", "dense"])


def test_serve_and_tune_take_the_proxy_flags_from_one_place():
    """`serve` and `tune` share --proxy, --gradient, --epsilon, --proxy-dtype and --proxy-token-budget:
    same names, defaults, types and help (``add_proxy_flags``); an unset budget is the settings' default."""
    import argparse

    from antidistill.server.startup.flags import DEFAULT_PROXY_TOKENS, add_proxy_flags
    from antidistill.server.tune.sweep import parser as tune_parser

    def described(ap):
        keys = ("option_strings", "dest", "default", "type", "choices", "metavar", "help", "nargs")
        return {a.dest: tuple(repr(getattr(a, k)) for k in keys) for a in ap._actions}

    alone = argparse.ArgumentParser(add_help=False)
    add_proxy_flags(alone)
    shared = described(alone)
    assert set(shared) == {"proxy", "gradient", "epsilon", "proxy_dtype", "proxy_token_budget"}
    for ap in (serve_parser(), tune_parser()):
        mine = described(ap)
        assert {dest: mine[dest] for dest in shared} == shared, ap.prog
    assert DEFAULT_PROXY_TOKENS == 16384 and tune_parser().parse_args([]).proxy_token_budget is None


def test_gradient_values_are_read_by_one_rule():
    """``NAME=PATH`` everywhere; a bare PATH only where a profile name is implied (``tune``: ``default``)."""
    from antidistill.server.startup.flags import parse_gradient

    assert parse_gradient("math=/g/a=b.safetensors") == ("math", "/g/a=b.safetensors")
    assert parse_gradient("/g/math.safetensors", bare_name="default") == ("default", "/g/math.safetensors")
    for bad in ("math", "=/g.safetensors", "math="):
        with pytest.raises(ValueError, match="expected NAME=PATH"):
            parse_gradient(bad)
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        parse_gradient("math=", bare_name="default")


def test_embedded_default_adds_only_the_vllm_flags_not_given():
    """``--flag value`` and ``--flag=value`` both count as given; the rest come from EMBEDDED_VLLM_DEFAULTS."""
    from antidistill.server.embedded.setup import EMBEDDED_VLLM_DEFAULTS, with_vllm_defaults

    args = with_vllm_defaults(["--host", "0.0.0.0", "--port=9000", "--enforce-eager"], "/models/t")
    assert args[:3] == ["--host", "0.0.0.0", "--port=9000"]
    added = dict(zip(args[4::2], args[5::2], strict=True))
    assert added == {
        "--model": "/models/t",
        **{k: v for k, v in EMBEDDED_VLLM_DEFAULTS.items() if k not in ("--host", "--port")},
    }
    assert with_vllm_defaults([], "/t")[-1] == "--enforce-eager"


@pytest.mark.parametrize(
    "flags",
    [
        ("--distributed-executor-backend", "ray"),
        ("--headless",),
        ("--nnodes", "2"),
        ("--data-parallel-size", "2", "--data-parallel-size-local", "1"),
    ],
)
def test_workers_on_other_hosts_stop_startup(models, flags):
    """The failure ledger is this host's shared memory: a worker elsewhere could not make the gateway refuse."""
    problem = remote_workers_problem(vllm_args(models, *flags))
    assert problem is not None and flags[0] in problem and "fail closed" in problem


def test_local_parallel_workers_start(models):
    for flags in ((), ("--tensor-parallel-size", "2"), ("--data-parallel-size", "2"), ("--api-server-count", "2")):
        assert remote_workers_problem(vllm_args(models, *flags)) is None, flags
