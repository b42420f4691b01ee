"""ONE command, side by side in one run on the same models and prompts: plain vLLM (no processor),
our server at λ = 0 and at λ > 0 (through HTTP with the load generator), and an official-style
implementation (HF generate + two cached HF proxies, static batches); with the roofline bound
T / (T + 2P) from parameter counts and the share of it reached.

    python -m antidistill.benchmarks.overhead --out benchmarks/results/overhead-cpu.json

Two workloads at each concurrency C:
- ``equal``: every request the same 64 output tokens (ignore_eos), max(C, 4) requests — the
  static batch's best case;
- ``mixed``: what users send (``workload.mixed_requests``): prompts of ≈ 70–700 tokens, output
  budgets log-uniform 16–160, EOS on, max(2C, 8) requests. The official style runs them in
  arrival order, C at a time, each batch until its longest row stops; only the tokens a request
  asked for (through its EOS, within its budget) count.
Greedy; rounds alternate the order of the three servers. Both servers get the same vLLM flags; this
process takes on the CPU settings ``antidistill serve`` would add (``server/startup/cpu_platform.py``: thread
placement, allocator), so both servers and the official style (on every usable core) run with them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import yaml
from antidistill.benchmarks.launch import free_port, running_server
from antidistill.benchmarks.load import LoadConfig, run_load, summarize
from antidistill.benchmarks.report import write_json
from antidistill.benchmarks.workload import benchmark_gradient, chat_token_ids, mixed_requests, questions
from antidistill.proxy_worker.core.plan import ATTENTION_PATHS, AttentionPath
from antidistill.server.embedded.model import prepare_half_proxy, prepare_smollm2
from antidistill.server.startup.cpu_platform import (
    RESERVED_ENV,
    TUNABLES_ENV,
    apply_engine_env,
    engine_env,
    usable_cpus,
)
from antidistill.server.tiers import new_key


def parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def start_servers(
    stack: ExitStack,
    teacher: Path,
    proxy: Path,
    grad: Path,
    lam: float,
    tmp: Path,
    attention: AttentionPath = "reference",
) -> dict:
    """Plain vLLM and our server, both up for the whole run (same vLLM flags)."""
    common = [
        "--model",
        str(teacher),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "32",
        "--host",
        "127.0.0.1",
        "--served-model-name",
        "teacher",
    ]
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    tiers = {"clean": {"lambda": 0.0}, "protected": {"lambda": lam}}
    keys, entries = {}, []
    for tier in tiers:
        keys[tier], digest = new_key()
        entries.append({"sha256": digest, "tier": tier})
    (tmp / "tiers.yaml").write_text(yaml.safe_dump({"tiers": tiers, "keys": entries}))
    vanilla_port, ours_port = free_port(), free_port()
    vanilla = stack.enter_context(
        running_server(
            ["-m", "vllm.entrypoints.openai.api_server", *common, "--port", str(vanilla_port)],
            env,
            tmp / "vanilla.log",
            vanilla_port,
        )
    )
    ours = stack.enter_context(
        running_server(
            [
                "-m",
                "antidistill.server",
                "serve",
                "--proxy",
                str(proxy),
                "--gradient",
                f"bench={grad}",
                "--tiers",
                str(tmp / "tiers.yaml"),
                "--audit-log",
                str(tmp / "audit.jsonl"),
                "--proxy-attention",
                attention,
                *common,
                "--port",
                str(ours_port),
            ],
            env,
            tmp / "ours.log",
            ours_port,
        )
    )
    return {"vanilla": (vanilla, ""), "lambda_0": (ours, keys["clean"]), "lambda_pos": (ours, keys["protected"])}


@dataclass(frozen=True)
class Workload:
    """The requests of one (workload, concurrency) point: texts, their budgets, EOS handling."""

    name: str
    concurrency: int
    prompts: list[str]
    budgets: list[int]
    ignore_eos: bool


def workload(name: str, concurrency: int, max_tokens: int) -> Workload:
    if name == "equal":
        count = max(concurrency, 4)
        return Workload(name, concurrency, questions(count), [max_tokens] * count, True)
    prompts, budgets = mixed_requests(max(2 * concurrency, 8))
    return Workload(name, concurrency, prompts, budgets, False)


def http_tokens_per_second(base: str, key: str, load: Workload) -> float:
    cfg = LoadConfig(
        base,
        "teacher",
        {"t": key},
        {"t": 1.0},
        load.concurrency,
        len(load.prompts),
        3600,
        max(load.budgets),
        True,
        {"ignore_eos": load.ignore_eos, "temperature": 0},
        prompts=load.prompts,
        budgets=load.budgets,
    )
    samples, elapsed = asyncio.run(run_load(cfg))
    summary = summarize(samples, elapsed)
    if summary["errors_by_status"]:
        raise RuntimeError(f"errors during the benchmark: {summary['errors_by_status']}")
    return summary["output_tokens_per_s"]


def official_tokens_per_second(
    teacher: Path, proxy: Path, grad: Path, lam: float, eps: float, loads: list[Workload]
) -> dict[tuple[str, int], float]:
    import torch
    from antidistill.benchmarks.official_style import OfficialStyle, load_official_style
    from antidistill.proxy_worker.core.config import load_config
    from antidistill.proxy_worker.core.gradient_file import load_gradient
    from antidistill.proxy_worker.core.weights import load_proxy_state
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.set_num_threads(usable_cpus())
    cfg = load_config(proxy)
    proxies = load_official_style(proxy, load_proxy_state(proxy, cfg), load_gradient(grad, cfg), eps)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    pad = AutoTokenizer.from_pretrained(teacher).pad_token_id or 0
    eos = GenerationConfig.from_pretrained(teacher).eos_token_id
    official = OfficialStyle(model, proxies, lam, eps, pad)
    out = {}
    for load in loads:
        ids = chat_token_ids(teacher, load.prompts)
        if load.ignore_eos:  # one static batch of C rows, every row the same length
            tps = official.tokens_per_second(ids[: load.concurrency], load.budgets[0])
        else:
            tps = official.mixed_tokens_per_second(ids, load.budgets, load.concurrency, eos)
        print(f"{load.name:<6} concurrency {load.concurrency:>3} official  {tps:8.1f} tok/s", flush=True)
        out[load.name, load.concurrency] = tps
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lambda", dest="lam", type=float, default=0.002)
    ap.add_argument("--epsilon", type=float, default=1e-3)
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request of the equal workload")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--workloads", nargs="+", choices=("equal", "mixed"), default=["equal", "mixed"])
    ap.add_argument("--proxy-attention", choices=ATTENTION_PATHS, default="reference", help="our server's")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    added = engine_env(os.environ, usable_cpus())
    for line in apply_engine_env(added):
        print(line, flush=True)
    teacher = prepare_smollm2()
    proxy = prepare_half_proxy(teacher)
    grad = benchmark_gradient(proxy)
    T, P = parameter_count(teacher), parameter_count(proxy)
    bound = T / (T + 2 * P)
    loads = [workload(w, c, args.max_tokens) for w in args.workloads for c in args.concurrency]
    samples: dict[str, list[float]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        targets = start_servers(stack, teacher, proxy, grad, args.lam, Path(tmp), args.proxy_attention)
        names = list(targets)
        http_tokens_per_second(*targets["vanilla"], workload("equal", 1, 4))  # warm-up
        for load in loads:
            for r in range(args.rounds):
                for name in names[r % 3 :] + names[: r % 3]:
                    tps = http_tokens_per_second(*targets[name], load)
                    samples.setdefault(f"{load.name}/{load.concurrency}/{name}", []).append(tps)
                    print(
                        f"{load.name:<6} concurrency {load.concurrency:>3} round {r} {name:<10} {tps:8.1f} tok/s",
                        flush=True,
                    )
    official = official_tokens_per_second(teacher, proxy, grad, args.lam, args.epsilon, loads)
    rows = []
    print(f"\nroofline bound T/(T+2P) = {T / 1e6:.0f}M / ({T / 1e6:.0f}M + 2×{P / 1e6:.0f}M) = {bound:.3f}")
    print(
        f"{'workload':<8} {'conc':>4} {'vanilla':>8} {'λ=0':>8} {'λ>0':>8} {'official':>8} {'λ0/van':>7} "
        f"{'λ>0/van':>8} {'of bound':>8} {'λ>0/off':>8}"
    )
    for load in loads:
        key = f"{load.name}/{load.concurrency}"
        med = {n: statistics.median(samples[f"{key}/{n}"]) for n in ("vanilla", "lambda_0", "lambda_pos")}
        off = official[load.name, load.concurrency]
        row = dict(
            workload=load.name,
            concurrency=load.concurrency,
            requests=len(load.prompts),
            requested_tokens=sum(load.budgets),
            **{f"{k}_tok_s": v for k, v in med.items()},
            official_style_tok_s=off,
            lambda_0_over_vanilla=med["lambda_0"] / med["vanilla"],
            lambda_pos_over_vanilla=med["lambda_pos"] / med["vanilla"],
            share_of_bound=med["lambda_pos"] / med["vanilla"] / bound,
            lambda_pos_over_official=med["lambda_pos"] / off,
        )
        rows.append(row)
        print(
            f"{load.name:<8} {load.concurrency:>4} {med['vanilla']:>8.1f} {med['lambda_0']:>8.1f} "
            f"{med['lambda_pos']:>8.1f} {off:>8.1f} {row['lambda_0_over_vanilla']:>7.3f} "
            f"{row['lambda_pos_over_vanilla']:>8.3f} {row['share_of_bound']:>8.2f} "
            f"{row['lambda_pos_over_official']:>8.2f}"
        )
    write_json(
        args.out,
        dict(
            teacher_params=T,
            proxy_params=P,
            roofline_bound=bound,
            lam=args.lam,
            epsilon=args.epsilon,
            max_tokens=args.max_tokens,
            proxy_attention=args.proxy_attention,
            usable_cpus=usable_cpus(),
            cpu_env={k: os.environ.get(k) for k in (RESERVED_ENV, TUNABLES_ENV, "LD_PRELOAD")},
            samples=samples,
            rows=rows,
        ),
    )


if __name__ == "__main__":
    main()
