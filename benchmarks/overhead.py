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
Greedy. Per point (workload, concurrency): one warm-up round through every target first (recorded
as ``warmup`` in the JSON, never in a median: the first round runs on a cold prefix cache), then
``--rounds`` ≥ 3 measured rounds, each in a rotated order of the targets (``benchmarks/rounds.py``).
Each figure is printed as its median with the spread [min–max over the measured rounds]; each ratio
as the ratio of the medians with [min–max of the per-round ratios]. The official style runs once
per point (no spread). Our servers are ``VARIANTS``: one ``antidistill serve`` per entry, each
serving a λ = 0 and a λ > 0 tier; all servers get the same vLLM flags; this
process takes on the CPU settings ``antidistill serve`` would add (``server/startup/cpu_platform.py``: thread
placement, allocator), so every server and the official style (on every usable core) run with them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import yaml
from antidistill.benchmarks.launch import free_port, running_server
from antidistill.benchmarks.load import LoadConfig, run_load, summarize
from antidistill.benchmarks.report import write_json
from antidistill.benchmarks.rounds import (
    MIN_ROUNDS,
    SPREAD,
    Rounds,
    check_rounds,
    format_spread,
    measure_rounds,
    ratio,
    summary,
)
from antidistill.benchmarks.workload import benchmark_gradient, chat_token_ids, mixed_requests, questions
from antidistill.proxy_worker.core.delta_mode import FULL, DeltaMode
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


BASE = "ours"
TIERS = {"lambda_0": "clean", "lambda_pos": "protected"}
"""Target name of each tier our servers serve → its tier in tiers.yaml (λ = 0, and ``--lambda``)."""


@dataclass(frozen=True)
class Variant:
    """One ``antidistill serve`` process of the run: its name and the flags it adds after the shared
    ones (``--proxy``, ``--gradient bench=…``, ``--tiers``, the vLLM flags). Every variant serves the
    tiers in ``tiers`` and gets a row per tier and point; a variant's target is the tier's name
    (``lambda_pos``) for ``BASE`` and ``lambda_pos@NAME`` for the others. A row per Δ mode is one
    more entry in ``VARIANTS`` with the mode's flags."""

    name: str
    serve_args: tuple[str, ...] = ()
    tiers: tuple[str, ...] = tuple(TIERS)
    mode: DeltaMode = FULL  # the Δ mode of its gradient (core/delta_mode.py)

    def target(self, tier: str) -> str:
        return tier if self.name == BASE else f"{tier}@{self.name}"

    def targets(self) -> dict[str, str]:
        """Target name → tier name."""
        return {self.target(t): t for t in self.tiers}


VARIANTS: tuple[Variant, ...] = (Variant(BASE),)


def mode_variants(modes: Sequence[DeltaMode]) -> tuple[Variant, ...]:
    """``VARIANTS`` plus one server per restricted Δ mode, measured on λ > 0 (at λ = 0 no mode runs)."""
    return VARIANTS + tuple(Variant(str(m).replace(":", ""), tiers=("lambda_pos",), mode=m) for m in modes)


def start_servers(
    stack: ExitStack,
    teacher: Path,
    proxy: Path,
    grads: Mapping[DeltaMode, Path],
    lam: float,
    tmp: Path,
    attention: AttentionPath = "reference",
    variants: Sequence[Variant] = VARIANTS,
) -> dict[str, tuple[str, str]]:
    """Plain vLLM and one server per variant, all up for the whole run (same vLLM flags) →
    target name → (base URL, API key); ``vanilla`` first."""
    if len({v.name for v in variants}) != len(variants):
        raise ValueError(f"variant names repeat: {[v.name for v in variants]}")
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
    vanilla_port = free_port()
    vanilla = stack.enter_context(
        running_server(
            ["-m", "vllm.entrypoints.openai.api_server", *common, "--port", str(vanilla_port)],
            env,
            tmp / "vanilla.log",
            vanilla_port,
        )
    )
    targets = {"vanilla": (vanilla, "")}
    for i, variant in enumerate(variants):
        stem = "ours" if variant.name == BASE else f"ours-{i}"
        port = free_port()
        base = stack.enter_context(
            running_server(
                [
                    "-m",
                    "antidistill.server",
                    "serve",
                    "--proxy",
                    str(proxy),
                    "--gradient",
                    f"bench={grads[variant.mode]}",
                    "--tiers",
                    str(tmp / "tiers.yaml"),
                    "--audit-log",
                    str(tmp / f"{stem}-audit.jsonl"),
                    "--proxy-attention",
                    attention,
                    *common,
                    *variant.serve_args,
                    "--port",
                    str(port),
                ],
                env,
                tmp / f"{stem}.log",
                port,
            )
        )
        targets.update({target: (base, keys[TIERS[tier]]) for target, tier in variant.targets().items()})
    return targets


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


def scaled(stats: dict, factor: float) -> dict:
    """A ratio's summary times ``factor`` (share of the bound, over the official style)."""
    return {
        "value": stats["value"] * factor,
        "min": stats["min"] * factor,
        "max": stats["max"] * factor,
        "rounds": [x * factor for x in stats["rounds"]],
    }


def point_row(
    load: Workload,
    measured: dict[str, Rounds],
    bound: float,
    official: float,
    targets: dict[str, str],
    order: list[list[str]] | None = None,
) -> dict:
    """The JSON row of one point. ``measured``: target → its rounds (``vanilla`` among them);
    ``targets``: our targets → tier. Per target: tok/s median with its spread (warm-up apart), the
    ratio to vanilla, and for λ > 0 targets the share of the roofline bound and the ratio to the
    official style (one run, so its spread is ours alone). The flat keys are the medians and ratios
    of the medians as the rows had them before rounds had spreads (diffable with older JSON)."""
    vanilla = measured["vanilla"].measured
    per_target: dict[str, dict] = {"vanilla": {"tok_s": summary(measured["vanilla"])}}
    for target, tier in targets.items():
        entry = {"tok_s": summary(measured[target]), "over_vanilla": ratio(measured[target].measured, vanilla)}
        if tier == "lambda_pos":
            entry["of_bound"] = scaled(entry["over_vanilla"], 1 / bound)
            entry["over_official"] = ratio(measured[target].measured, [official] * len(vanilla))
        per_target[target] = entry
    row = dict(
        workload=load.name,
        concurrency=load.concurrency,
        requests=len(load.prompts),
        requested_tokens=sum(load.budgets),
        **{f"{t}_tok_s": e["tok_s"]["median"] for t, e in per_target.items()},
        official_style_tok_s=official,
    )
    for target, entry in per_target.items():
        if target == "vanilla":
            continue
        row[f"{target}_over_vanilla"] = entry["over_vanilla"]["value"]
        if "of_bound" in entry:
            suffix = target.removeprefix("lambda_pos")
            row[f"share_of_bound{suffix}"] = entry["of_bound"]["value"]
            row[f"{target}_over_official"] = entry["over_official"]["value"]
    row["targets"] = per_target
    if order is not None:
        row["round_order"] = order
    return row


HEADER = (
    f"{'workload':<8} {'conc':>4} {'target':<16} {'tok/s [min–max]':<23}  {'/ vanilla [min–max]':<20}"
    f"  {'of bound':<17}  / official"
)
"""The table's header; ``row_lines`` prints under it."""


def row_lines(row: dict) -> list[str]:
    """The printed lines of one point: a line per target, median [min–max] beside each figure."""
    head = f"{row['workload']:<8} {row['concurrency']:>4}"
    lines = []
    for target, entry in row["targets"].items():
        line = f"{head} {target:<16} {format_spread(entry['tok_s'])}"
        if "over_vanilla" in entry:
            line += f"  {format_spread(entry['over_vanilla'], 6, 3)}"
        if "of_bound" in entry:
            line += f"  {format_spread(entry['of_bound'], 5, 2)}  {format_spread(entry['over_official'], 5, 2)}"
        lines.append(line.rstrip())
    lines.append(f"{head} {'official':<16} {row['official_style_tok_s']:>7.1f} (one run)")
    return lines


def samples_json(measured: dict[str, dict[str, Rounds]]) -> dict[str, list[float]]:
    """The measured rounds by ``workload/concurrency/target`` (the key format older results used);
    the warm-up rounds are not among them (``warmup_json``)."""
    return {f"{p}/{t}": list(r.measured) for p, by in measured.items() for t, r in by.items()}


def warmup_json(measured: dict[str, dict[str, Rounds]]) -> dict[str, float | None]:
    """The warm-up round of every ``workload/concurrency/target``: recorded, in no median."""
    return {f"{p}/{t}": r.warmup for p, by in measured.items() for t, r in by.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lambda", dest="lam", type=float, default=0.002)
    ap.add_argument("--epsilon", type=float, default=1e-3)
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request of the equal workload")
    ap.add_argument(
        "--rounds",
        type=int,
        default=MIN_ROUNDS,
        help=f"measured rounds per point (≥ {MIN_ROUNDS}), after one warm-up round per target that is not counted",
    )
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--workloads", nargs="+", choices=("equal", "mixed"), default=["equal", "mixed"])
    ap.add_argument("--proxy-attention", choices=ATTENTION_PATHS, default="reference", help="our server's")
    ap.add_argument(
        "--delta-modes",
        type=DeltaMode.parse,
        nargs="+",
        default=[],
        help="restricted Δ modes (head, last:K): one more server each, a λ > 0 row each beside the full mode's",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    try:
        check_rounds(args.rounds)
    except ValueError as exc:
        ap.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    variants = mode_variants(args.delta_modes)
    added = engine_env(os.environ, usable_cpus())
    for line in apply_engine_env(added):
        print(line, flush=True)
    teacher = prepare_smollm2()
    proxy = prepare_half_proxy(teacher)
    grads = {v.mode: benchmark_gradient(proxy, mode=v.mode) for v in variants}
    grad = grads[FULL]
    T, P = parameter_count(teacher), parameter_count(proxy)
    bound = T / (T + 2 * P)
    loads = {f"{w}/{c}": workload(w, c, args.max_tokens) for w in args.workloads for c in args.concurrency}
    ours = {t: tier for v in variants for t, tier in v.targets().items()}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        servers = start_servers(stack, teacher, proxy, grads, args.lam, Path(tmp), args.proxy_attention, variants)
        measured, orders = measure_rounds(
            loads,
            list(servers),
            args.rounds,
            lambda target, load: http_tokens_per_second(*servers[target], load),
            lambda line: print(line, flush=True),
        )
    official = official_tokens_per_second(teacher, proxy, grad, args.lam, args.epsilon, list(loads.values()))
    print(f"\nroofline bound T/(T+2P) = {T / 1e6:.0f}M / ({T / 1e6:.0f}M + 2×{P / 1e6:.0f}M) = {bound:.3f}")
    print(
        f"tok/s: median [min–max] of {args.rounds} measured rounds (one warm-up round per target before, "
        "not counted); ratios: of the medians [min–max of the per-round ratios]; official: one run"
    )
    print(HEADER)
    rows = []
    for label, load in loads.items():
        row = point_row(load, measured[label], bound, official[load.name, load.concurrency], ours, orders[label])
        rows.append(row)
        for line in row_lines(row):
            print(line)
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
            rounds=args.rounds,
            warmup_rounds=1,
            spread=SPREAD,
            official_style_runs=1,
            variants=[
                {"name": v.name, "serve_args": list(v.serve_args), "targets": v.targets(), "delta_mode": str(v.mode)}
                for v in variants
            ],
            samples=samples_json(measured),
            warmup=warmup_json(measured),
            rows=rows,
        ),
    )


if __name__ == "__main__":
    main()
