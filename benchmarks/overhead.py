"""ONE command, side by side in one run on the same models and prompts: plain vLLM (no processor),
our server at λ = 0 and at λ > 0 (through HTTP with the load generator), and an official-style
implementation (HF generate + two cached HF proxies, static batch); with the roofline bound
T / (T + 2P) from parameter counts and the share of it reached.

    python -m antidistill.benchmarks.overhead --out benchmarks/results/overhead-cpu.json

Defaults: the embedded SmolLM2-135M teacher, its 15-layer proxy, greedy, 64 output tokens per
request (fixed with ignore_eos), concurrency 1 and 32, rounds alternating the order.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

import yaml
from antidistill.benchmarks.load import LoadConfig, run_load, summarize
from antidistill.benchmarks.report import write_json
from antidistill.benchmarks.workload import benchmark_gradient, prompt_token_ids
from antidistill.server.embedded_model import prepare_half_proxy, prepare_smollm2
from antidistill.server.launch import free_port, running_server
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


def start_servers(stack: ExitStack, teacher: Path, proxy: Path, grad: Path, lam: float, tmp: Path) -> dict:
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


def http_tokens_per_second(base: str, key: str, concurrency: int, max_tokens: int) -> float:
    cfg = LoadConfig(
        base,
        "teacher",
        {"t": key},
        {"t": 1.0},
        concurrency,
        max(concurrency, 4),
        3600,
        max_tokens,
        True,
        {"ignore_eos": True, "temperature": 0},
    )
    samples, elapsed = asyncio.run(run_load(cfg))
    summary = summarize(samples, elapsed)
    if summary["errors_by_status"]:
        raise RuntimeError(f"errors during the benchmark: {summary['errors_by_status']}")
    return summary["output_tokens_per_s"]


def official_tokens_per_second(
    teacher: Path, proxy: Path, grad: Path, lam: float, eps: float, concurrency_levels: list[int], max_tokens: int
) -> dict[int, float]:
    import torch
    from antidistill.benchmarks.official_style import load_official_style, tokens_per_second
    from antidistill.proxy_worker.core.config import load_config
    from antidistill.proxy_worker.core.gradient_file import load_gradient
    from antidistill.proxy_worker.core.weights import load_proxy_state
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config(proxy)
    proxies = load_official_style(proxy, load_proxy_state(proxy, cfg), load_gradient(grad, cfg), eps)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    pad = AutoTokenizer.from_pretrained(teacher).pad_token_id or 0
    prompts = prompt_token_ids(teacher, max(concurrency_levels))
    return {c: tokens_per_second(model, proxies, prompts[:c], lam, eps, max_tokens, pad) for c in concurrency_levels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lambda", dest="lam", type=float, default=0.002)
    ap.add_argument("--epsilon", type=float, default=1e-3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    teacher = prepare_smollm2()
    proxy = prepare_half_proxy(teacher)
    grad = benchmark_gradient(proxy)
    T, P = parameter_count(teacher), parameter_count(proxy)
    bound = T / (T + 2 * P)
    samples: dict[str, list[float]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        targets = start_servers(stack, teacher, proxy, grad, args.lam, Path(tmp))
        names = list(targets)
        for conc in args.concurrency:
            http_tokens_per_second(*targets["vanilla"], 1, 4)  # warm-up
            for r in range(args.rounds):
                for name in names[r % 3 :] + names[: r % 3]:
                    tps = http_tokens_per_second(*targets[name], conc, args.max_tokens)
                    samples.setdefault(f"{conc}/{name}", []).append(tps)
                    print(f"concurrency {conc:>3} round {r} {name:<10} {tps:8.1f} tok/s", flush=True)
    official = official_tokens_per_second(
        teacher, proxy, grad, args.lam, args.epsilon, args.concurrency, args.max_tokens
    )
    rows = []
    print(f"\nroofline bound T/(T+2P) = {T / 1e6:.0f}M / ({T / 1e6:.0f}M + 2×{P / 1e6:.0f}M) = {bound:.3f}")
    print(
        f"{'conc':>4} {'vanilla':>8} {'λ=0':>8} {'λ>0':>8} {'official':>8} {'λ0/van':>7} {'λ>0/van':>8} "
        f"{'of bound':>8} {'λ>0/off':>8}"
    )
    for conc in args.concurrency:
        med = {n: statistics.median(samples[f"{conc}/{n}"]) for n in ("vanilla", "lambda_0", "lambda_pos")}
        row = dict(
            concurrency=conc,
            **{f"{k}_tok_s": v for k, v in med.items()},
            official_style_tok_s=official[conc],
            lambda_0_over_vanilla=med["lambda_0"] / med["vanilla"],
            lambda_pos_over_vanilla=med["lambda_pos"] / med["vanilla"],
            share_of_bound=med["lambda_pos"] / med["vanilla"] / bound,
            lambda_pos_over_official=med["lambda_pos"] / official[conc],
        )
        rows.append(row)
        print(
            f"{conc:>4} {med['vanilla']:>8.1f} {med['lambda_0']:>8.1f} {med['lambda_pos']:>8.1f} "
            f"{official[conc]:>8.1f} {row['lambda_0_over_vanilla']:>7.3f} {row['lambda_pos_over_vanilla']:>8.3f} "
            f"{row['share_of_bound']:>8.2f} {row['lambda_pos_over_official']:>8.2f}"
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
            samples=samples,
            rows=rows,
        ),
    )


if __name__ == "__main__":
    main()
