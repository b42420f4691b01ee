"""``antidistill tune``: what each strength does to the operator's own prompts, before a tier ships it.

    antidistill tune --model TEACHER --proxy PROXY --gradient math=g.safetensors --prompts prompts.jsonl \\
        [--strengths 0.25,0.5,1,2] [--tiers tiers.yaml] [--temperature 0.7] [--max-tokens 256] --out tune/

The real processor runs in vLLM's offline engine, the path the server takes, over a sweep of
strengths (λ = strength / s, s the Δ scale stored in each gradient file) and strength 0 (plain
sampling, the baseline) with the operator's sampling settings. Every request at a prompt index gets
the same sampling seed, so strengths differ only by what λ·Δ does. Per strength it reports:

- accuracy against the prompts' ``answer`` (``#### N`` / ``\\boxed{N}``, exact numbers), or, with no
  answers, agreement with the strength-0 answer (or text);
- trace quality (core/trace_quality.py): the unprotected teacher's NLL per emitted token, the
  degenerate-output rate, the mean length;
- the protection dose (proxy_worker/tools/dose.py): the mean full-g Δ of the completions' own tokens
  in strength units, the first-order rise of the proxy's held-out loss per unit of training on them
  (strength 0 at the operator's temperature is the reference);
- the proxy's share of the time per generated token (wall clock, against strength 0 in this run);
- side-by-side samples for the same prompts.

Prompts file: JSONL, one ``{"messages": [...]}`` (rendered with the teacher's chat template, as
``/v1/chat/completions`` does) or ``{"prompt": "..."}`` (as ``/v1/completions``) per line, with an
optional ``"answer"``. ``--tiers`` adds the strengths of an existing tiers file and marks them. Each
finished strength is kept under ``OUT/points/`` and reused by a rerun with the same inputs, so an
interrupted sweep resumes. Output: ``OUT/tune.md``, ``OUT/tune.png``, ``OUT/tune.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from antidistill.proxy_worker.core.answers import extract_answer, is_correct
from antidistill.proxy_worker.core.strength import lambda_for
from antidistill.proxy_worker.core.trace_quality import trace_quality
from antidistill.proxy_worker.runtime.offline import OfflineEngine, TraceRequest
from antidistill.proxy_worker.tools.traces import TokenizedTrace
from antidistill.server.startup.flags import DEFAULT_PROXY_TOKENS, add_proxy_flags
from antidistill.server.tune.inputs import (
    Profile,
    Prompt,
    TuneError,
    embedded_inputs,
    load_profiles,
    read_prompts,
    tier_strengths,
)

log = logging.getLogger("antidistill.tune")
DEFAULT_STRENGTHS = (0.25, 0.5, 1.0, 2.0, 4.0)
SAMPLE_PROMPTS = 3  # prompts shown side by side in the report
SAMPLE_CHARS = 400


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt ``index``: the same at every strength (common random numbers)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=4).digest(), "big")


def run_point(
    engine: OfflineEngine,
    prompts: Sequence[Prompt],
    profile: Profile,
    strength: float,
    sampling: dict[str, Any],
) -> dict[str, Any]:
    """One strength on one profile: completions, their teacher scores, and the time they took."""
    lam = lambda_for(strength, profile.scale)
    requests = [
        TraceRequest(p.ids, sampling["temperature"], lam, seed=request_seed(sampling["seed"], i), profile=profile.name)
        for i, p in enumerate(prompts)
    ]
    start = time.perf_counter()
    completions = engine.generate(requests, top_p=sampling["top_p"], max_tokens=sampling["max_tokens"])
    seconds = time.perf_counter() - start
    scores = engine.token_logprobs([p.ids for p in prompts], [c.token_ids for c in completions])
    return {
        "profile": profile.name,
        "strength": strength,
        "lambda": lam,
        "seconds": seconds,
        "completions": [{"text": c.text, "token_ids": c.token_ids, "finished": c.finished} for c in completions],
        "teacher_logprobs": scores,
    }


def summarize(point: dict[str, Any], baseline: dict[str, Any], prompts: Sequence[Prompt]) -> dict[str, Any]:
    """A point's figures: accuracy (or agreement with the baseline), trace quality, proxy time share."""
    texts = [c["text"] for c in point["completions"]]
    ids = [c["token_ids"] for c in point["completions"]]
    with_answers = all(p.answer is not None for p in prompts)
    if with_answers:
        hits = [is_correct(t, p.answer) for t, p in zip(texts, prompts, strict=True)]
        answered = [extract_answer(t) is not None for t in texts]
    else:
        hits = [agrees(t, c["text"]) for t, c in zip(texts, baseline["completions"], strict=True)]
        answered = None
    quality = trace_quality(ids, point["teacher_logprobs"], answered)
    tokens = sum(map(len, ids))
    base_tokens = sum(len(c["token_ids"]) for c in baseline["completions"])
    per_token, base_per_token = point["seconds"] / max(tokens, 1), baseline["seconds"] / max(base_tokens, 1)
    return {
        "profile": point["profile"],
        "strength": point["strength"],
        "lambda": point["lambda"],
        "accuracy": sum(hits) / len(hits),
        "accuracy_kind": "answers" if with_answers else "agreement with strength 0",
        **quality.as_dict(),
        "dose": point.get("dose"),
        "proxy_share": max(0.0, 1 - base_per_token / per_token) if point["strength"] > 0 else 0.0,
        "seconds": round(point["seconds"], 3),
        "tokens": tokens,
    }


def agrees(text: str, reference: str) -> bool:
    """Same final answer as the strength-0 completion (same text when that one has none)."""
    want = extract_answer(reference)
    return text.strip() == reference.strip() if want is None else extract_answer(text) == want


def fingerprint(args: argparse.Namespace, prompts_path: Path, profiles: Sequence[Profile]) -> str:
    """What a kept point was computed from; a change of any input recomputes every point."""
    parts = [
        str(Path(args.model).resolve()),
        str(Path(args.proxy).resolve()),
        prompts_path.read_text(),
        json.dumps(sampling_settings(args), sort_keys=True),
        *(f"{p.name}={Path(p.gradient).resolve()}:{Path(p.gradient).stat().st_mtime_ns}" for p in profiles),
        f"{args.epsilon}:{args.proxy_dtype}:{args.num_prompts}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens, "seed": args.seed}


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the sweep and write the report files; returns the report."""
    from antidistill.proxy_worker.runtime.offline import offline_engine
    from antidistill.server.tune import report as tune_report
    from tqdm import tqdm
    from transformers import AutoTokenizer

    profiles = load_profiles(args.gradient, args.proxy)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = read_prompts(args.prompts, tokenizer, args.num_prompts)
    tiers = tier_strengths(args.tiers, profiles) if args.tiers else []
    strengths = sorted({0.0, *args.strengths})
    todo = [(p, b) for p in profiles for b in strengths]
    todo += [(next(p for p in profiles if p.name == t["profile"]), t["strength"]) for t in tiers]
    todo = list(dict.fromkeys(todo))
    out: Path = args.out
    kept = out / "points"
    kept.mkdir(parents=True, exist_ok=True)
    stamp = fingerprint(args, args.prompts, profiles)
    raw: dict[tuple[str, float], dict[str, Any]] = {}
    for profile, b in todo:
        f = kept / f"{profile.name}-{b:.6g}.json"
        if f.is_file() and (data := json.loads(f.read_text())).get("fingerprint") == stamp:
            raw[(profile.name, b)] = data
    missing = [(p, b) for p, b in todo if (p.name, b) not in raw]
    start = time.perf_counter()
    if missing:
        settings = {
            "proxy": args.proxy,
            "profiles": {p.name: {"gradient": p.gradient} for p in profiles},
            "epsilon": args.epsilon,
            "proxy_dtype": args.proxy_dtype,
            "max_lambda": max(lambda_for(b, p.scale) for p, b in todo) * 1.01 + 1e-9,
            "token_budget": args.proxy_token_budget or DEFAULT_PROXY_TOKENS,
        }
        engine_args = {
            "dtype": args.dtype,
            "enforce_eager": True,
            "max_model_len": args.max_model_len,
            "max_num_seqs": args.max_num_seqs,
            "kv_cache_gib": args.kv_cache_gib,
        }
        with offline_engine(args.model, settings, seed=args.seed, engine_args=engine_args) as engine:
            warm = [TraceRequest(prompts[0].ids, 0.0)]
            engine.generate(warm, top_p=1.0, max_tokens=4)  # compile and allocate before anything is timed
            for profile, b in tqdm(missing, desc="strengths", unit="point", disable=not sys.stderr.isatty()):
                point = run_point(engine, prompts, profile, b, sampling_settings(args))
                point["fingerprint"] = stamp
                (kept / f"{profile.name}-{b:.6g}.json").write_text(json.dumps(point))
                raw[(profile.name, b)] = point
                log.info("strength %g on %s: %.0f s", b, profile.name, point["seconds"])
    add_doses(raw, todo, prompts, args.proxy, kept)
    points = [summarize(raw[(p.name, b)], raw[(p.name, 0.0)], prompts) for p, b in raw_keys(todo)]
    samples = [
        {
            "prompt": prompts[i].text,
            "outputs": [
                {"profile": p.name, "strength": b, "text": raw[(p.name, b)]["completions"][i]["text"][:SAMPLE_CHARS]}
                for p, b in raw_keys(todo)
            ],
        }
        for i in range(min(SAMPLE_PROMPTS, len(prompts)))
    ]
    report = {
        "command": "antidistill tune " + " ".join(args.argv),
        "settings": {
            "model": args.model,
            "proxy": args.proxy,
            "gradients": {p.name: {"path": p.gradient, "delta_scale": p.scale} for p in profiles},
            "prompts_file": str(args.prompts),
            "prompts": len(prompts),
            **sampling_settings(args),
            "epsilon": args.epsilon,
            "proxy_dtype": args.proxy_dtype,
        },
        "seconds": time.perf_counter() - start,  # this run's wall time (kept points cost nothing)
        "sampling_seconds": sum(raw[(p.name, b)]["seconds"] for p, b in raw_keys(todo)),
        "points": points,
        "recommendations": tune_report.recommend(points),
        "tiers": tiers,
        "samples": samples,
    }
    (out / "tune.json").write_text(json.dumps(report, indent=2))
    tune_report.plot(points, tiers, out / "tune.png")
    (out / "tune.md").write_text(tune_report.markdown(report, "tune.png") + "\n")
    return report


def add_doses(
    raw: dict[tuple[str, float], dict[str, Any]],
    todo: Sequence[tuple[Profile, float]],
    prompts: Sequence[Prompt],
    proxy: str,
    kept: Path,
) -> None:
    """The protection dose of each point's completions, computed once and kept with the point."""
    from antidistill.proxy_worker.tools.dose import DoseMeter

    meters: dict[str, DoseMeter] = {}
    for profile, b in todo:
        point = raw[(profile.name, b)]
        if "dose" in point:
            continue
        if profile.name not in meters:
            meters[profile.name] = DoseMeter.from_files(proxy, profile.gradient, profile.scale)
        traces = [
            TokenizedTrace([*p.ids, *c["token_ids"]], len(p.ids))
            for p, c in zip(prompts, point["completions"], strict=True)
        ]
        point["dose"] = meters[profile.name].mean_dose(traces)
        (kept / f"{profile.name}-{b:.6g}.json").write_text(json.dumps(point))


def raw_keys(todo: Sequence[tuple[Profile, float]]) -> list[tuple[Profile, float]]:
    """The sweep's points in report order (profile, then strength)."""
    return sorted(todo, key=lambda t: (t[0].name, t[1]))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="antidistill tune", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--embedded-default",
        action="store_true",
        help="tune the embedded default (make serve's teacher, proxy, gradient and demo tiers) on gsm_symbolic "
        "problems the gradient did not see; prepares what is not cached yet",
    )
    ap.add_argument("--model", help="teacher model directory (what `serve --model` gets)")
    add_proxy_flags(ap)  # --proxy, --gradient, --epsilon, --proxy-dtype, --proxy-token-budget: as `serve`'s
    ap.add_argument("--prompts", type=Path, help="JSONL: {messages | prompt, answer?} per line")
    ap.add_argument("--num-prompts", type=int, help="use only the first N prompts")
    ap.add_argument(
        "--strengths",
        type=lambda text: [float(x) for x in text.split(",") if x.strip()],
        default=list(DEFAULT_STRENGTHS),
        help="comma-separated strengths to sweep (0 is always added) (default: %(default)s)",
    )
    ap.add_argument("--tiers", type=Path, help="also evaluate, and mark, the strengths of this tiers file")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="teacher dtype (vLLM --dtype)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="CPU KV cache space for the teacher")
    ap.add_argument("--out", type=Path, default=Path("tune"), help="report folder (default: %(default)s)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    args = ap.parse_args(argv)
    args.argv = argv
    if any(b < 0 for b in args.strengths):
        ap.error("--strengths must be ≥ 0")
    if args.embedded_default:
        embedded_inputs(args)
    missing = [f"--{name}" for name in ("model", "proxy", "gradient", "prompts") if not getattr(args, name)]
    if missing:
        ap.error(f"{', '.join(missing)} required (or --embedded-default)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = sweep(args)
    except TuneError as exc:
        print(f"antidistill tune: {exc}", file=sys.stderr)
        return 1
    for r in report["recommendations"]:
        print(f"{r['profile']}: {r['tolerance']} → strength ≤ {r['max_strength']:g}")
    print(f"report: {args.out / 'tune.md'} ({args.out / 'tune.png'}, {args.out / 'tune.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
