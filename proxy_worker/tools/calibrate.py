"""ε calibration (the paper's appendix B, on the operator's own proxy and gradient).

    antidistill calibrate --proxy DIR --gradient grad.safetensors --prompts traces.jsonl

For every ε and serving dtype, the finite-difference Δ (θ ± εg built in fp32, cast, run, then
differenced in fp32) is compared with the exact directional derivative (forward-mode JVP in fp64)
at every token position of the sample texts. Too small an ε drowns Δ in round-off of the serving
dtype; too large an ε adds truncation error. The recommendation is the ε with the lowest error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from antidistill.proxy_worker.core.config import ProxyConfig, load_config
from antidistill.proxy_worker.core.delta import delta_scale, exact_delta, finite_difference
from antidistill.proxy_worker.core.gradient_file import load_gradient
from antidistill.proxy_worker.core.model import StackedProxy
from antidistill.proxy_worker.core.plan import StepPlan, build_plan
from antidistill.proxy_worker.core.rope import RotaryTable
from antidistill.proxy_worker.core.weights import DTYPES, load_proxy_state, stack_copies, stack_perturbed

log = logging.getLogger(__name__)
DEFAULT_EPSILONS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
RELIABLE_ERROR = 0.1


@dataclass(frozen=True)
class CalibrationPoint:
    dtype: str
    epsilon: float
    mean_sin: float
    max_sin: float
    mean_rel_error: float
    max_rel_error: float


def compare(fd: torch.Tensor, exact: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: sine of the angle between Δ_fd and Δ_exact, and ‖Δ_fd − Δ_exact‖ / ‖Δ_exact‖."""
    fd, exact = fd.double(), exact.double()
    cos = torch.nn.functional.cosine_similarity(fd, exact, dim=-1).clamp(-1, 1)
    rel = (fd - exact).norm(dim=-1) / exact.norm(dim=-1).clamp(min=1e-30)
    return torch.sqrt(1 - cos**2), rel


def exact_reference(
    cfg: ProxyConfig, theta: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor], plan: StepPlan
) -> torch.Tensor:
    """Δ at every position of ``plan`` by forward-mode AD in fp64: the ground truth."""
    return exact_delta(
        stack_copies([theta], cfg, torch.float64),
        stack_copies([grad], cfg, torch.float64),
        cfg,
        RotaryTable(cfg),
        plan,
        output="all",
    )


def calibrate(
    cfg: ProxyConfig,
    theta: Mapping[str, torch.Tensor],
    grad: Mapping[str, torch.Tensor],
    plan: StepPlan,
    epsilons: Sequence[float],
    dtypes: Sequence[str],
    exact: torch.Tensor | None = None,
) -> list[CalibrationPoint]:
    """Error of finite differences against the fp64 JVP (``exact``, computed when not given) for each (dtype, ε)."""
    if exact is None:
        exact = exact_reference(cfg, theta, grad, plan)
    scale = delta_scale(exact)
    log.info("Δ scale: per-token std %.4g logits per unit λ (λ ≈ %.2g shifts logits by one std)", scale, 1 / scale)
    points = []
    for name in dtypes:
        for eps in epsilons:
            params = stack_perturbed(theta, grad, (eps, -eps), cfg, DTYPES[name])
            fd = finite_difference(StackedProxy(cfg, params).logits(plan, output="all"), eps)
            sin, rel = compare(fd, exact)
            point = CalibrationPoint(
                name, eps, float(sin.mean()), float(sin.max()), float(rel.mean()), float(rel.max())
            )
            log.info("%s ε=%g: sin %.3g, rel %.3g", name, eps, point.mean_sin, point.mean_rel_error)
            points.append(point)
    return points


def recommend(points: Sequence[CalibrationPoint]) -> dict[str, CalibrationPoint]:
    """Per dtype, the ε with the lowest mean relative error."""
    best: dict[str, CalibrationPoint] = {}
    for p in points:
        if p.dtype not in best or p.mean_rel_error < best[p.dtype].mean_rel_error:
            best[p.dtype] = p
    return best


def sample_token_ids(tokenizer: object, path: Path, count: int, max_tokens: int) -> list[list[int]]:
    """Texts from a traces JSONL (prompt + completion / rendered messages) or plain text lines."""
    from antidistill.proxy_worker.tools.traces import tokenize_trace

    seqs = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and ("messages" in rec or "prompt" in rec):
            ids = tokenize_trace(tokenizer, rec if "messages" in rec else {"completion": "", **rec}).ids
        else:
            ids = tokenizer(line)["input_ids"]
        seqs.append(list(ids)[:max_tokens])
        if len(seqs) == count:
            break
    if not seqs:
        raise ValueError(f"{path}: no sample texts")
    return seqs


def format_table(points: Sequence[CalibrationPoint]) -> str:
    rows = [f"{'dtype':<9} {'epsilon':>8} {'mean sin':>9} {'max sin':>9} {'mean rel':>9} {'max rel':>9}"]
    rows += [
        f"{p.dtype:<9} {p.epsilon:>8.0e} {p.mean_sin:>9.2e} {p.max_sin:>9.2e} {p.mean_rel_error:>9.2e} "
        f"{p.max_rel_error:>9.2e}"
        for p in points
    ]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="antidistill calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--proxy", required=True)
    ap.add_argument("--gradient", required=True)
    ap.add_argument("--prompts", required=True, type=Path, help="traces JSONL or a text file, one sample a line")
    ap.add_argument("--num", type=int, default=4, help="samples to use")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per sample")
    ap.add_argument("--epsilons", default=",".join(f"{e:g}" for e in DEFAULT_EPSILONS))
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--json", type=Path, help="write the table and recommendation here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from transformers import AutoTokenizer

    dtypes = [d.strip() for d in args.dtypes.split(",")]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        ap.error(f"unknown dtype {unknown[0]!r}; expected some of {sorted(DTYPES)}")
    cfg = load_config(args.proxy)
    theta = load_proxy_state(args.proxy, cfg)
    grad = load_gradient(args.gradient, cfg)
    seqs = sample_token_ids(AutoTokenizer.from_pretrained(args.proxy), args.prompts, args.num, args.max_tokens)
    points = calibrate(
        cfg, theta, grad, build_plan(seqs, [0] * len(seqs)), [float(e) for e in args.epsilons.split(",")], dtypes
    )
    print(format_table(points))
    best = recommend(points)
    for name, p in best.items():
        verdict = (
            "" if p.mean_rel_error < RELIABLE_ERROR else "  (unreliable in this dtype: serve the proxy in float32)"
        )
        print(f"recommended epsilon for {name}: {p.epsilon:g} (mean rel error {p.mean_rel_error:.2e}){verdict}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "points": [asdict(p) for p in points],
                    "recommended": {k: v.epsilon for k, v in best.items()},
                    "samples": len(seqs),
                    "positions": sum(map(len, seqs)),
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
