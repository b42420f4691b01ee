"""``antidistill`` — the command operators run.

    antidistill serve --model TEACHER --proxy PROXY --gradient math=g.safetensors --tiers tiers.yaml [vLLM flags]
    antidistill serve --embedded-default        # SmolLM2 teacher + proxy + gradient + demo tiers (make serve)
    antidistill keygen --tier pro --name acme   # prints a new key and the line for the tiers file
    antidistill eval toy [--out DIR]            # distillation-attack evaluation (resumable; see README)

``serve`` starts vLLM's OpenAI-compatible server in this process with the antidistillation logits
processor and the tier middleware; every flag it does not know goes to vLLM untouched.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from antidistill.proxy_worker.runtime.settings import (
    CONFIG_KEY,
    ENV_VAR,
    ProcessorSettings,
    SettingsError,
    parse_settings,
)
from antidistill.server.config import DRAIN_ENV, GatewayConfig
from antidistill.server.tiers import TiersError, TierTable, load_tiers, new_key

PROCESSOR = "antidistill.proxy_worker.runtime.vllm_v1:AntidistillationLogitsProcessor"
MIDDLEWARE = "antidistill.server.middleware.AntidistillationMiddleware"


DEFAULT_PROXY_TOKENS = ProcessorSettings.model_fields["token_budget"].default


class StartupError(RuntimeError):
    """A configuration problem found before vLLM starts; printed as one line."""


def serve_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="antidistill serve", add_help=False)
    ap.add_argument("--proxy", help="proxy model directory (shares the teacher's tokenizer)")
    ap.add_argument(
        "--gradient",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="gradient profile (repeatable); the first is the default profile",
    )
    ap.add_argument(
        "--epsilon", type=float, default=1e-3, help="finite-difference ε (see antidistill.proxy_worker.tools.calibrate)"
    )
    ap.add_argument("--tiers", help="tiers YAML (API keys → λ)")
    ap.add_argument("--proxy-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--proxy-token-budget",
        type=int,
        help=f"proxy KV tokens per profile (default {DEFAULT_PROXY_TOKENS}); the teacher's KV is capped to fit it, "
        "or, given --num-gpu-blocks-override alone, the pool is sized from that",
    )
    ap.add_argument("--max-lambda", type=float, default=50.0, help="largest λ the engine accepts")
    ap.add_argument("--audit-log", default="audit.jsonl", help="JSON-lines audit file ('-' for stderr)")
    ap.add_argument("--audit-text", action="store_true", help="include prompt text in audit lines")
    ap.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest generation request body in bytes, larger ones get 413 (default: 64 × max-model-len + 1 MiB)",
    )
    ap.add_argument(
        "--embedded-default",
        action="store_true",
        help="prepare and serve the embedded SmolLM2 default (teacher, proxy, gradient, demo tiers)",
    )
    return ap


def processor_settings(ours: argparse.Namespace) -> ProcessorSettings:
    if not ours.proxy or not ours.gradient:
        raise StartupError("--proxy and at least one --gradient NAME=PATH are required")
    profiles = {}
    for item in ours.gradient:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise StartupError(f"--gradient {item!r}: expected NAME=PATH")
        if not Path(path).is_file():
            raise StartupError(f"--gradient {name}: {path}: file not found")
        profiles[name] = path
    preflight(ours.proxy, profiles)
    raw = {
        "proxy": ours.proxy,
        "profiles": profiles,
        "epsilon": ours.epsilon,
        "proxy_dtype": ours.proxy_dtype,
        "token_budget": ours.proxy_token_budget or DEFAULT_PROXY_TOKENS,
        "max_lambda": ours.max_lambda,
    }
    try:
        return parse_settings(raw, "antidistill serve")
    except SettingsError as exc:
        raise StartupError(str(exc)) from None


def preflight(proxy: str, gradients: dict[str, str]) -> None:
    """Proxy config and weights index, and each gradient's names and shapes, before vLLM starts."""
    from antidistill.proxy_worker.core.config import ProxyConfigError, load_config
    from antidistill.proxy_worker.core.gradient_file import check_gradient_header
    from antidistill.proxy_worker.core.weights import WeightsError, expected_shapes, safetensors_files
    from antidistill.server.preflight import CheckpointError, check_proxy_weights

    try:
        cfg = load_config(proxy)
        check_proxy_weights(safetensors_files(proxy), list(expected_shapes(cfg)))
        for path in gradients.values():
            check_gradient_header(path, cfg)
    except (ProxyConfigError, WeightsError, CheckpointError) as exc:
        raise StartupError(str(exc)) from None


def check_tiers(tiers: TierTable, settings: ProcessorSettings) -> None:
    """Every tier must be servable: its profile loaded, its λ range within the engine's maximum."""
    for name, tier in tiers.spec.tiers.items():
        if tier.profile and tier.profile not in settings.profiles:
            raise StartupError(
                f"{tiers.source}: tiers.{name}.profile: {tier.profile!r} is not a loaded --gradient "
                f"profile ({', '.join(settings.profiles)})"
            )
        if tier.max_lambda > settings.max_lambda:
            raise StartupError(
                f"{tiers.source}: tiers.{name}.max_lambda {tier.max_lambda:g} exceeds "
                f"--max-lambda {settings.max_lambda:g}"
            )


def fresh_metrics_dir() -> None:
    """Worker-side metrics reach /metrics through prometheus_client's multiprocess mode: a fresh,
    empty directory per start (set before vLLM or prometheus_client is imported), removed on exit."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    path = tempfile.mkdtemp(prefix="antidistill-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def couple_capacity(
    args: argparse.Namespace, ours: argparse.Namespace, settings: ProcessorSettings
) -> ProcessorSettings:
    """Cap the teacher's KV to the proxy pool, or size the pool from the teacher's cap (kv_plan)."""
    from antidistill.proxy_worker.core.config import load_config
    from antidistill.proxy_worker.runtime.capacity import CapacityError
    from antidistill.server.kv_plan import describe_plan, plan_capacity

    try:
        plan = plan_capacity(args, ours.proxy_token_budget, DEFAULT_PROXY_TOKENS)
    except CapacityError as exc:
        raise StartupError(str(exc)) from None
    args.num_gpu_blocks_override = plan.teacher_blocks
    print(
        "antidistill: " + describe_plan(plan, args, load_config(ours.proxy), ours.proxy_dtype, len(settings.profiles)),
        file=sys.stderr,
        flush=True,
    )
    return settings.model_copy(update={"token_budget": plan.proxy_tokens})


def with_our_processor(processors: list) -> list:
    """vLLM's processor list plus ours — unless a subclass of ours is already there (it replaces ours)."""
    from antidistill.proxy_worker.runtime.vllm_v1 import AntidistillationLogitsProcessor
    from vllm.utils.import_utils import resolve_obj_by_qualname

    def ours(entry: object) -> bool:
        cls = resolve_obj_by_qualname(entry.replace(":", ".")) if isinstance(entry, str) else entry
        return isinstance(cls, type) and issubclass(cls, AntidistillationLogitsProcessor)

    return processors if any(ours(p) for p in processors) else [*processors, PROCESSOR]


def fresh_failure_ledger() -> Path:
    """The file through which the worker tells the gateway which protected requests lost Δ: a new
    one per start (an operator's ``ANTIDISTILL_FAILURE_LEDGER`` path is created afresh), removed on exit."""
    from antidistill.proxy_worker.runtime.failure_ledger import ENV_VAR, create

    given = os.environ.get(ENV_VAR)
    if given:
        return create(given)
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = tempfile.mkdtemp(prefix="antidistill-ledger-", dir=root)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return create(Path(folder) / "failures.bin")


def serve(argv: Sequence[str]) -> None:
    if "-h" in argv or "--help" in argv:
        serve_parser().print_help()
        print("\nEvery other flag goes to vLLM (see: python -m vllm.entrypoints.openai.api_server --help).")
        return
    ours, rest = serve_parser().parse_known_args(argv)
    if ours.embedded_default:
        from antidistill.server.default_setup import embedded_default

        ours, rest = embedded_default(ours, rest)
    settings = processor_settings(ours)
    if ours.max_body_bytes is not None and ours.max_body_bytes < 1024:
        raise StartupError(f"--max-body-bytes {ours.max_body_bytes}: must be at least 1024")
    if not ours.tiers:
        raise StartupError("--tiers FILE is required (see `antidistill keygen` and README: Tiers)")
    try:
        tiers = load_tiers(ours.tiers)
    except TiersError as exc:
        raise StartupError(str(exc)) from None
    check_tiers(tiers, settings)
    check_teacher_args(rest)

    fresh_metrics_dir()
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    args = make_arg_parser(FlexibleArgumentParser(prog="antidistill serve")).parse_args(rest)
    if not any(a.startswith(("--logprobs-mode", "--logprobs_mode")) for a in rest):
        args.logprobs_mode = "processed_logprobs"  # logprobs describe the protected distribution
    check_logprobs_mode(str(args.logprobs_mode), tiers)
    settings = couple_capacity(args, ours, settings)
    config = settings.model_dump()
    os.environ[ENV_VAR] = json.dumps({CONFIG_KEY: config})
    GatewayConfig(
        tiers=Path(ours.tiers),
        ledger=fresh_failure_ledger(),
        audit_log=ours.audit_log,
        audit_text=ours.audit_text,
        drain_timeout=float(os.environ.get(DRAIN_ENV, "120")),
        max_body_bytes=ours.max_body_bytes,
    ).export()
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the V1 path is the tested one (README)
    args.additional_config = {**(args.additional_config or {}), CONFIG_KEY: config}
    args.logits_processors = with_our_processor(args.logits_processors or [])
    args.middleware = [*(args.middleware or []), MIDDLEWARE]
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))
    from antidistill.server.lifecycle import stopped_without_signal

    if stopped_without_signal():  # vLLM exits 0 then; an orchestrator must see a failure and restart us
        raise StartupError("the vLLM engine process died, so the server stopped (see the log above); exit status 1")


def check_logprobs_mode(mode: str, tiers: TierTable) -> None:
    """Raw logprobs are the unprotected teacher's distribution: no protected tier may return them."""
    if not mode.startswith("raw"):
        return
    for name, tier in tiers.spec.tiers.items():
        if (tier.max_lambda > 0 or tier.escalation is not None) and tier.max_logprobs:
            raise StartupError(
                f"--logprobs-mode {mode} would hand protected tier {name!r} the raw teacher's logprobs "
                f"(max_logprobs {tier.max_logprobs}); use processed_logprobs or set its max_logprobs to 0"
            )


def check_teacher_args(vllm_args: Sequence[str]) -> None:
    """A local --model directory must be readable before vLLM's workers are spawned."""
    from antidistill.server.preflight import CheckpointError, check_teacher, looks_local, model_argument

    model = model_argument(vllm_args)
    if model is not None and looks_local(model):
        try:
            check_teacher(model)
        except CheckpointError as exc:
            raise StartupError(str(exc)) from None


def keygen(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="antidistill keygen", description="print a new API key and its tiers-file entry")
    ap.add_argument("--tier", required=True)
    ap.add_argument("--name")
    args = ap.parse_args(argv)
    key, digest = new_key()
    entry = {"sha256": digest, "tier": args.tier, **({"name": args.name} if args.name else {})}
    print(f"key (give to the client, shown once): {key}")
    print(f"tiers file entry under keys:           - {json.dumps(entry)}")


def evaluate(argv: Sequence[str]) -> None:
    from antidistill.benchmarks.distillation.cli import main as run_evaluation

    if run_evaluation(argv) != 0:
        raise StartupError("evaluation stopped")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": serve, "keygen": keygen, "eval": evaluate}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        commands[argv[0]](argv[1:])
    except StartupError as exc:
        print(f"antidistill: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
