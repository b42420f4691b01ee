"""``antidistill serve``: vLLM's OpenAI-compatible server in this process, with the antidistillation
logits processor and the tier middleware.

    antidistill serve --model TEACHER --proxy PROXY --gradient math=g.safetensors --tiers tiers.yaml [vLLM flags]
    antidistill serve --embedded-default        # SmolLM2 teacher + proxy + gradient + demo tiers (make serve)

Every flag it does not know goes to vLLM untouched. Everything that can be checked before vLLM starts
(checkpoints, gradients, tiers, capacities, secrets) is, and a failure is one line and exit status 1.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from antidistill.proxy_worker.core.strength import ProfileScales
from antidistill.proxy_worker.runtime.settings import (
    CONFIG_KEY,
    ENV_VAR,
    PROCESSOR_PATH,
    PROCESSOR_PATH_V2,
    ProcessorSettings,
    SettingsError,
    parse_settings,
)
from antidistill.server.gateway.config import DRAIN_ENV, GatewayConfig, GatewayConfigError
from antidistill.server.gateway.metrics_key import MetricsKeyError, resolve_metrics_key
from antidistill.server.gateway.metrics_key import startup_line as metrics_line
from antidistill.server.gateway.tier_checks import EngineLimits
from antidistill.server.gateway.trusted_gateway import GatewaySecretError, resolve_secret, startup_line
from antidistill.server.startup.cpu_platform import (
    CoresError,
    apply_engine_env,
    engine_env,
    local_workers,
    numa_nodes,
    on_cpu,
    pipeline_eager_problem,
    usable_cpus,
)
from antidistill.server.startup.flags import DEFAULT_PROXY_TOKENS, parse_gradient, serve_parser
from antidistill.server.startup.metrics_dir import fresh_metrics_dir
from antidistill.server.startup.preflight import (
    StartupError,
    check_checkpoints,
    check_logprobs_mode,
    check_teacher_args,
    check_tiers,
    describe_tiers,
    profile_modes,
    profile_scales,
    remote_workers_problem,
)
from antidistill.server.tiers import TiersError, load_tiers

if TYPE_CHECKING:
    from vllm.config import VllmConfig

MIDDLEWARE = "antidistill.server.gateway.middleware.AntidistillationMiddleware"
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
# Whether vLLM may pick its model runner itself when RUNNER_ENV is unset (V2 on CUDA, V1 on CPU).
# False until benchmarks/gpu_v2_check.py has passed on a GPU: until then an unset RUNNER_ENV means V1.
V2_RUNNER_BY_DEFAULT = False


def processor_settings(ours: argparse.Namespace) -> ProcessorSettings:
    if not ours.proxy or not ours.gradient:
        raise StartupError("--proxy and at least one --gradient NAME=PATH are required")
    profiles = {}
    for item in ours.gradient:
        try:
            name, path = parse_gradient(item)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if not Path(path).is_file():
            raise StartupError(f"--gradient {name}: {path}: file not found")
        profiles[name] = path
    check_checkpoints(ours.proxy, profiles)
    raw = {
        "proxy": ours.proxy,
        "profiles": profiles,
        "epsilon": ours.epsilon,
        "proxy_dtype": ours.proxy_dtype,
        "proxy_attention": ours.proxy_attention,
        "token_budget": ours.proxy_token_budget or DEFAULT_PROXY_TOKENS,
        "max_lambda": ours.max_lambda,
    }
    try:
        return parse_settings(raw, "antidistill serve")
    except SettingsError as exc:
        raise StartupError(str(exc)) from None


def gateway_config(
    ours: argparse.Namespace, scales: ProfileScales, gateway_secret: str | None, metrics_key: str | None
) -> GatewayConfig:
    """The gateway's settings from the flags, checked by ``GatewayConfig.validate`` (the rules the
    gateway applies when it reads them back) before vLLM starts. The failure ledger, the engine's
    limits and the seed rule are filled in once vLLM's flags are parsed (``dataclasses.replace``)."""
    try:
        return GatewayConfig(
            tiers=Path(ours.tiers),
            ledger=Path(),  # made once every check has passed (fresh_failure_ledger)
            audit_log=ours.audit_log,
            audit_text=ours.audit_text,
            drain_timeout=float(os.environ.get(DRAIN_ENV, "120")),
            max_body_bytes=ours.max_body_bytes,
            gateway_secret=gateway_secret,
            gateway_max_skew=ours.gateway_max_skew,
            state=ours.state,
            state_lease_seconds=ours.state_lease_seconds,
            state_timeout=ours.state_timeout,
            scales=scales,
            tenant_salt_key=None if ours.shared_prefix_cache else secrets.token_bytes(32),
            metrics_key=metrics_key,
        ).validate()
    except GatewayConfigError as exc:
        raise StartupError(str(exc)) from None


def couple_capacity(
    args: argparse.Namespace, ours: argparse.Namespace, settings: ProcessorSettings
) -> ProcessorSettings:
    """Cap the teacher's KV to the proxy pool, or size the pool from the teacher's cap (kv_plan)."""
    from antidistill.proxy_worker.core.config import load_config
    from antidistill.proxy_worker.runtime.capacity import CapacityError
    from antidistill.server.startup.kv_plan import describe_plan, plan_capacity

    try:
        plan = plan_capacity(args, ours.proxy_token_budget, DEFAULT_PROXY_TOKENS)
    except CapacityError as exc:
        raise StartupError(str(exc)) from None
    args.num_gpu_blocks_override = plan.teacher_blocks
    proxy = load_config(ours.proxy)
    print(
        "antidistill: " + describe_plan(plan, args, proxy, ours.proxy_dtype, profile_modes(settings, proxy)),
        file=sys.stderr,
        flush=True,
    )
    return settings.model_copy(update={"token_budget": plan.proxy_tokens})


def engine_config(args: argparse.Namespace) -> VllmConfig:
    """vLLM's engine config for these flags, built as vLLM's server builds it, so what is read from it
    (the model runner, speculative decoding) is vLLM's own decision, not a copy of its rules."""
    if not V2_RUNNER_BY_DEFAULT:
        os.environ.setdefault(RUNNER_ENV, "0")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    try:
        return AsyncEngineArgs.from_cli_args(args).create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    except ValueError as exc:  # vLLM's own check of its flags (pydantic's errors span lines)
        raise StartupError("vLLM: " + " ".join(str(exc).split())) from None


def processor_for(config: VllmConfig) -> str:
    """The adapter for the model runner vLLM will use (``VllmConfig.use_v2_model_runner``); the
    runner is then pinned in the environment, so the API server and the engine cannot disagree."""
    if config.speculative_config is not None:
        raise StartupError(
            "speculative decoding (--speculative-config) is not supported with antidistillation: draft tokens "
            "would be verified against logits without λ·Δ; drop the flag"
        )
    v2 = config.use_v2_model_runner
    os.environ[RUNNER_ENV] = "1" if v2 else "0"
    return PROCESSOR_PATH_V2 if v2 else PROCESSOR_PATH


def with_our_processor(processors: list, ours: str = PROCESSOR_PATH) -> list:
    """vLLM's processor list plus ``ours`` — unless a subclass of it is already there (it replaces
    ours); the other runner's adapter stops start-up (vLLM would refuse it later, in the engine)."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    def resolve(entry: object) -> object:
        return resolve_obj_by_qualname(entry.replace(":", ".")) if isinstance(entry, str) else entry

    named = [resolve(p) for p in processors]

    def listed(path: str) -> bool:
        adapter = resolve(path)
        return any(isinstance(c, type) and issubclass(c, adapter) for c in named)

    other = PROCESSOR_PATH if ours == PROCESSOR_PATH_V2 else PROCESSOR_PATH_V2
    if listed(other):
        runner = "V2" if ours == PROCESSOR_PATH_V2 else "V1"
        raise StartupError(
            f"--logits-processors names {other}, the adapter of the other model runner (vLLM will use its "
            f"{runner} runner); drop it: antidistill serve adds the matching one"
        )
    return processors if listed(ours) else [*processors, ours]


def fresh_failure_ledger() -> Path:
    """The file through which the worker tells the gateway which protected requests lost Δ: a new
    one per start, removed on exit. An operator's ``ANTIDISTILL_FAILURE_LEDGER`` path replaces a
    ledger an earlier start left there; anything else at that path (a symlink, another file) stops start-up."""
    from antidistill.proxy_worker.runtime.failure_ledger import ENV_VAR, LedgerPathTaken, create, recreate

    given = os.environ.get(ENV_VAR)
    if given:
        try:
            return recreate(given)
        except LedgerPathTaken as exc:
            raise StartupError(f"{ENV_VAR}: {exc}") from None
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    folder = tempfile.mkdtemp(prefix="antidistill-ledger-", dir=root)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return create(Path(folder) / "failures.bin")


def prepared_default(ours: argparse.Namespace, rest: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The embedded SmolLM2 default, prepared (or found in its cache); its holdout traces need the
    ``demo`` extra the first time."""
    from antidistill.server.embedded.setup import embedded_default

    try:
        return embedded_default(ours, rest)
    except ModuleNotFoundError as exc:
        if exc.name != "reasoning_gym":
            raise
        raise StartupError(
            "--embedded-default writes its holdout traces from reasoning-gym problems, which is not installed: "
            "pip install 'antidistill[demo]'"
        ) from None


def main(argv: Sequence[str]) -> int:
    """Exit status 1 with one line for a problem found before vLLM starts (or an engine that died)."""
    try:
        serve(argv)
    except StartupError as exc:
        print(f"antidistill: {exc}", file=sys.stderr)
        return 1
    return 0


def serve(argv: Sequence[str]) -> None:
    if "-h" in argv or "--help" in argv:
        serve_parser().print_help()
        print("\nEvery other flag goes to vLLM (see: python -m vllm.entrypoints.openai.api_server --help).")
        return
    ours, rest = serve_parser().parse_known_args(argv)
    if ours.embedded_default:
        ours, rest = prepared_default(ours, rest)
    settings = processor_settings(ours)
    if not ours.tiers:
        raise StartupError("--tiers FILE is required (see `antidistill keygen` and docs/serving.md: Tiers)")
    scales = profile_scales(settings)
    try:
        tiers = load_tiers(ours.tiers, scales)
    except TiersError as exc:
        raise StartupError(str(exc)) from None
    check_tiers(tiers, settings)
    check_teacher_args(rest)
    try:
        gateway_secret = resolve_secret(ours.trust_gateway, os.environ)
        metrics_key = resolve_metrics_key(ours.metrics_key_file, os.environ)
    except (GatewaySecretError, MetricsKeyError) as exc:
        raise StartupError(str(exc)) from None
    gateway = gateway_config(ours, scales, gateway_secret, metrics_key)
    if gateway_secret:
        print("antidistill: " + startup_line(ours.gateway_max_skew, len(tiers.spec.keys)), file=sys.stderr, flush=True)

    fresh_metrics_dir()  # the CLI set it already; a caller of main() that bypassed the CLI gets one here
    import uvloop
    from antidistill.server.startup.vllm_cli import (
        cli_env_setup,
        make_arg_parser,
        run_multi_api_server,
        validate_parsed_serve_args,
    )
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    args = make_arg_parser(FlexibleArgumentParser(prog="antidistill serve")).parse_args(rest)
    if not any(a.startswith(("--logprobs-mode", "--logprobs_mode")) for a in rest):
        args.logprobs_mode = "processed_logprobs"  # logprobs describe the protected distribution
    engine = EngineLimits(tuple(settings.profiles), settings.max_lambda, str(args.logprobs_mode))
    check_logprobs_mode(engine.logprobs_mode, tiers)
    settings = couple_capacity(args, ours, settings)
    config = settings.model_dump()
    os.environ[ENV_VAR] = json.dumps({CONFIG_KEY: config})
    dataclasses.replace(
        gateway,
        ledger=fresh_failure_ledger(),
        engine=engine,  # a SIGHUP reload runs this function's tiers checks again, against these limits
        refuse_seeds=on_cpu(),
    ).export()
    args.additional_config = {**(args.additional_config or {}), CONFIG_KEY: config}
    args.logits_processors = with_our_processor(args.logits_processors or [], processor_for(engine_config(args)))
    args.middleware = [*(args.middleware or []), MIDDLEWARE]
    validate_parsed_serve_args(args)
    if (problem := remote_workers_problem(args)) is not None:
        raise StartupError(problem)
    lines = describe_tiers(tiers)
    if (shut := metrics_line(metrics_key)) is not None:  # one line: /metrics stays shut
        lines.append(shut)
    for line in lines:
        print(f"antidistill: {line}", file=sys.stderr, flush=True)
    if on_cpu():  # last, so a start-up error stays one line; before vLLM starts its processes
        problem = pipeline_eager_problem(args.pipeline_parallel_size, args.enforce_eager)
        if problem is not None:
            raise StartupError(problem)
        data_local = args.data_parallel_size_local or args.data_parallel_size
        workers = local_workers(args.tensor_parallel_size, args.pipeline_parallel_size, data_local)
        try:
            added = engine_env(os.environ, usable_cpus(), workers, numa_nodes())
        except CoresError as exc:
            raise StartupError(str(exc)) from None
        for line in apply_engine_env(added):
            print(f"antidistill: {line}", file=sys.stderr, flush=True)
    if (args.api_server_count or 1) > 1:  # vLLM's own launcher: N API-server processes, one port, each with the gateway
        run_multi_api_server(args)
        return
    uvloop.run(run_server(args))
    from antidistill.server.gateway.lifecycle import stopped_without_signal

    if stopped_without_signal():  # vLLM exits 0 then; an orchestrator must see a failure and restart us
        raise StartupError("the vLLM engine process died, so the server stopped (see the log above); exit status 1")
