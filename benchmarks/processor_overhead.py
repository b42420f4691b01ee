"""Output tokens/s of vanilla vLLM vs our processor at λ = 0 vs λ > 0, at 1 and 32 concurrent
requests, side by side in one run (both engines stay up; rounds alternate their order).

    python -m antidistill.benchmarks.processor_overhead --out benchmarks/results/processor_overhead-cpu.json

Teacher: the embedded SmolLM2-135M-Instruct. Proxy: its first 15 layers (same tokenizer), with a
gradient from gsm_symbolic worked solutions (cost does not depend on the gradient's values).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from antidistill.benchmarks.report import write_json
from antidistill.benchmarks.workload import benchmark_gradient, prompt_token_ids
from antidistill.proxy_worker.runtime.settings import PROCESSOR_PATH
from antidistill.server.embedded.model import prepare_half_proxy, prepare_smollm2


def tokens_per_second(llm, batch: list[list[int]], lam: float | None, max_tokens: int) -> float:
    from vllm import SamplingParams

    extra = None if lam is None else {"ad_lambda": lam}
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
    start = time.perf_counter()
    out = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(r.outputs[0].token_ids) for r in out) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxy", type=Path, help="proxy directory (default: half-depth SmolLM2)")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.002)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    teacher = prepare_smollm2()
    proxy = args.proxy or prepare_half_proxy(teacher)
    settings = {"proxy": str(proxy), "profiles": {"default": str(benchmark_gradient(proxy))}, "epsilon": 1e-3}
    os.environ["ANTIDISTILL_CONFIG"] = json.dumps({"antidistillation": settings})
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    common = dict(model=str(teacher), dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=32, seed=0)
    engines = {"vanilla": LLM(**common), "processor": LLM(**common, logits_processors=[PROCESSOR_PATH])}
    variants = [("vanilla", "vanilla", None), ("lambda_0", "processor", 0.0), ("lambda_pos", "processor", args.lam)]
    all_prompts = prompt_token_ids(teacher, max(args.concurrency))
    for llm in engines.values():  # warm-up
        tokens_per_second(llm, all_prompts[:2], None, 4)
    samples: dict[tuple[int, str], list[float]] = {}
    for conc in args.concurrency:
        for r in range(args.rounds):
            order = variants[r % 3 :] + variants[: r % 3]
            for name, engine, lam in order:
                tps = tokens_per_second(engines[engine], all_prompts[:conc], lam, args.max_tokens)
                samples.setdefault((conc, name), []).append(tps)
                print(f"concurrency {conc:>3} round {r} {name:<10} {tps:8.1f} tok/s", flush=True)
    rows = []
    print(f"\n{'conc':>4} {'vanilla':>9} {'λ=0':>9} {'λ>0':>9} {'λ=0/van':>8} {'λ>0/van':>8}")
    for conc in args.concurrency:
        med = {name: statistics.median(samples[(conc, name)]) for name, _, _ in variants}
        row = dict(
            concurrency=conc,
            **{f"{k}_tok_s": v for k, v in med.items()},
            lambda_0_ratio=med["lambda_0"] / med["vanilla"],
            lambda_pos_ratio=med["lambda_pos"] / med["vanilla"],
        )
        rows.append(row)
        print(
            f"{conc:>4} {med['vanilla']:>9.1f} {med['lambda_0']:>9.1f} {med['lambda_pos']:>9.1f} "
            f"{row['lambda_0_ratio']:>8.3f} {row['lambda_pos_ratio']:>8.3f}"
        )
    result = dict(
        teacher=teacher.name,
        proxy=proxy.name,
        lam=args.lam,
        max_tokens=args.max_tokens,
        rounds=args.rounds,
        machine=platform.processor() or platform.machine(),
        samples={f"{c}/{n}": v for (c, n), v in samples.items()},
        rows=rows,
    )
    write_json(args.out, result)


if __name__ == "__main__":
    main()
