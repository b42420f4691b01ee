"""Start-up checks: everything ``antidistill serve`` can verify before vLLM starts.

vLLM reports a missing or corrupt local model as a long traceback from a spawned worker (or tries a
model hub); an operator should see one line naming the file instead. Only headers are read (cheap).
The same holds for tiers the engine could not serve and for a logprobs mode that would leak the raw
teacher (server/gateway/tier_checks.py, shared with the gateway's tiers reload): each problem is a
``StartupError`` whose message is the one line printed.
"""

from __future__ import annotations

import json
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path

from antidistill.proxy_worker.core.config import ProxyConfig, ProxyConfigError, load_config
from antidistill.proxy_worker.core.delta_mode import DeltaMode
from antidistill.proxy_worker.core.gradient_file import check_gradient_header, read_delta_scale
from antidistill.proxy_worker.core.strength import ProfileScales
from antidistill.proxy_worker.core.weights import (
    WeightsError,
    check_shapes,
    expected_shapes,
    proxy_parameters,
    safetensors_files,
)
from antidistill.proxy_worker.runtime.settings import ProcessorSettings
from antidistill.server.gateway import tier_checks
from antidistill.server.gateway.tier_checks import TierCheckError, check_profiles_and_lambda
from antidistill.server.tiers import TierTable
from safetensors import safe_open


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served; the message names the file."""


def model_argument(vllm_args: Sequence[str]) -> str | None:
    """The value of ``--model`` (either spelling) among the flags passed through to vLLM."""
    args = list(vllm_args)
    for i, arg in enumerate(args):
        if arg == "--model" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return None


def looks_local(model: str) -> bool:
    """A filesystem path rather than a hub id like ``org/name``."""
    return model.startswith((".", "/", "~")) or Path(model).exists()


def check_teacher(model: str) -> None:
    """A local teacher directory must have a readable config.json and readable weight headers."""
    root = Path(model).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"--model {model}: directory not found")
    config = root / "config.json"
    if not config.is_file():
        raise CheckpointError(f"--model {config}: not found")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"--model {config}: invalid JSON ({exc})") from None
    shards = sorted(root.glob("*.safetensors"))
    if not shards and not any(root.glob("*.bin")) and not any(root.glob("*.pt")):
        raise CheckpointError(f"--model {root}: no weight files (*.safetensors, *.bin)")
    for shard in shards:
        check_safetensors_header(shard, "--model")


def check_safetensors_header(path: Path, what: str) -> dict[str, tuple[int, ...]]:
    """The tensor shapes in one file; a truncated or garbage file is a CheckpointError naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{what} {path}: cannot read safetensors ({exc})") from None


def check_proxy_weights(shards: Sequence[Path], cfg: ProxyConfig) -> None:
    """Every proxy parameter, with its shape, in some readable shard, and nothing else: the check
    the worker makes when it loads them (``check_shapes``), from the headers only."""
    found: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"--proxy {shard}: not found")
        found.update(check_safetensors_header(shard, "--proxy"))
    check_shapes(proxy_parameters(found, cfg), expected_shapes(cfg), f"--proxy {shards[0].parent}")


class StartupError(RuntimeError):
    """A configuration problem found before vLLM starts; printed as one line."""


def check_checkpoints(proxy: str, gradients: dict[str, str]) -> None:
    """Proxy config and weights index, and each gradient's names and shapes, before vLLM starts."""
    try:
        cfg = load_config(proxy)
        check_proxy_weights(safetensors_files(proxy), cfg)
        for path in gradients.values():
            check_gradient_header(path, cfg)
    except (ProxyConfigError, WeightsError, CheckpointError) as exc:
        raise StartupError(str(exc)) from None


def profile_modes(settings: ProcessorSettings, cfg: ProxyConfig) -> list[DeltaMode]:
    """Each profile's Δ mode, as its gradient file states it (checked by ``check_checkpoints``)."""
    try:
        return [check_gradient_header(spec.gradient, cfg, spec.mode) for spec in settings.profiles.values()]
    except WeightsError as exc:
        raise StartupError(str(exc)) from None


def profile_scales(settings: ProcessorSettings) -> ProfileScales:
    """Each loaded profile's Δ scale, read from its gradient file's metadata (None: it stores none)."""
    try:
        scales = {name: read_delta_scale(spec.gradient) for name, spec in settings.profiles.items()}
    except WeightsError as exc:
        raise StartupError(str(exc)) from None
    gradients = {name: spec.gradient for name, spec in settings.profiles.items()}
    return ProfileScales(scales, settings.default_profile, gradients, settings.proxy)


def describe_tiers(tiers: TierTable) -> list[str]:
    """One start-up line per tier: its λ and what that is as a strength on its profile."""
    lines = []
    for name, tier in tiers.spec.tiers.items():
        profile = tiers.scales.profile(tier.profile)
        scale = tiers.scales.scale(profile)
        given = "strength" if tier.strength is not None else "lambda"
        strength = "strength unknown (its gradient stores no Δ scale)"
        if scale is not None:
            low, mid, high = (
                tiers.scales.strength(lam, profile) for lam in (tier.min_lambda, tier.lambda_, tier.max_lambda)
            )
            strength = f"strength {mid:.4g} [{low:.4g}, {high:.4g}] at Δ scale {scale:.4g}"
        lines.append(
            f"tier {name} (given as {given}): λ {tier.lambda_:.4g} [{tier.min_lambda:.4g}, {tier.max_lambda:.4g}] "
            f"on profile {profile}, {strength}"
        )
    return lines


def check_tiers(tiers: TierTable, settings: ProcessorSettings) -> None:
    """Every tier must be servable: its profile loaded, its λ within the engine's maximum (the rules
    live in server/gateway/tier_checks.py, which the gateway's reload runs too)."""
    try:
        check_profiles_and_lambda(tiers, tuple(settings.profiles), settings.max_lambda)
    except TierCheckError as exc:
        raise StartupError(str(exc)) from None


def check_logprobs_mode(mode: str, tiers: TierTable) -> None:
    """Raw logprobs are the unprotected teacher's distribution: no protected tier may return them."""
    try:
        tier_checks.check_logprobs_mode(tiers, mode)
    except TierCheckError as exc:
        raise StartupError(str(exc)) from None


def check_teacher_args(vllm_args: Sequence[str]) -> None:
    """A local --model directory must be readable before vLLM's workers are spawned."""
    model = model_argument(vllm_args)
    if model is not None and looks_local(model):
        try:
            check_teacher(model)
        except CheckpointError as exc:
            raise StartupError(str(exc)) from None


def remote_workers_problem(args: Namespace) -> str | None:
    """Flags that put vLLM workers (and so the sampling rank) where this gateway cannot read their
    refusals: the failure ledger is this host's shared memory, so a row the worker withholds would
    reach the client as a 200 of noise instead of a 503. Refused until the ledger crosses hosts."""
    dp, dp_local = args.data_parallel_size, args.data_parallel_size_local
    found = [
        (args.distributed_executor_backend == "ray", "--distributed-executor-backend ray"),
        (args.headless, "--headless"),
        ((args.nnodes or 1) > 1, f"--nnodes {args.nnodes}"),
        (dp_local is not None and dp_local < dp, f"--data-parallel-size-local {dp_local} of {dp}"),
    ]
    flag = next((flag for hit, flag in found if hit), None)
    if flag is None:
        return None
    return (
        f"{flag}: vLLM workers on other hosts cannot report a protection failure to this gateway (its failure "
        "ledger is this host's shared memory), so fail closed could not hold; not supported yet "
        "(docs/serving.md: More than one worker or API server)"
    )
