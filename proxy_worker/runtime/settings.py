"""Operator settings of the antidistillation processor, and per-request arguments.

vLLM builds logits processors itself, in two processes: the API server (``validate_params``, at
admission) and the engine worker (``__init__``). Both read the same settings, from the
``antidistillation`` key of vLLM's ``--additional-config`` JSON (the worker sees the engine
config) or from the ``ANTIDISTILL_CONFIG`` environment variable (a JSON string or a path to a JSON
file), which the API-server process also sees. ``antidistill serve`` sets both.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from antidistill.proxy_worker.core.delta_mode import DeltaMode
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_VAR = "ANTIDISTILL_CONFIG"
CONFIG_KEY = "antidistillation"
# What vLLM's ``--logits-processors`` takes; strings, so naming the adapters imports no vLLM.
PROCESSOR_PATH = "antidistill.proxy_worker.runtime.vllm_v1:AntidistillationLogitsProcessor"
PROCESSOR_PATH_V2 = "antidistill.proxy_worker.runtime.vllm_v2:AntidistillationLogitsProcessorV2"
Mode = Literal["ad", "permutation"]
OnFailure = Literal["refuse", "degrade"]
REQUEST_KEYS = ("ad_lambda", "ad_profile", "ad_mode", "ad_ticket", "ad_on_failure", "ad_salt", "ad_tier")
# what an absent key means (ad_profile "": the settings' default profile)
REQUEST_DEFAULTS = {
    "ad_profile": "",
    "ad_mode": "ad",
    "ad_ticket": None,
    "ad_on_failure": "refuse",
    "ad_salt": None,
    "ad_tier": "",
}
MAX_TICKET = 2**63 - 1
MAX_SALT = 128  # characters of ``ad_salt`` (the gateway's are 41)
MAX_TIER = 64  # characters of ``ad_tier``: a metrics label, so bounded


class SettingsError(ValueError):
    """The processor's configuration is missing or invalid; start-up must stop."""


class ProfileSpec(BaseModel):
    """One gradient profile; ε defaults to the global one (calibrate per gradient: it scales with |g|)."""

    model_config = ConfigDict(extra="forbid")

    gradient: str
    epsilon: float | None = Field(None, gt=0)
    delta_mode: str | None = Field(
        None, description="the Δ mode g was written for (full, head, last:K); default: the gradient file's"
    )

    @field_validator("delta_mode")
    @classmethod
    def _mode(cls, value: str | None) -> str | None:
        return None if value is None else str(DeltaMode.parse(value))

    @property
    def mode(self) -> DeltaMode | None:
        """The Δ mode the profile names (None: take the gradient file's)."""
        return None if self.delta_mode is None else DeltaMode.parse(self.delta_mode)


class ProcessorSettings(BaseModel):
    """Keys of the ``antidistillation`` config object (see docs/serving.md: "Plain vLLM")."""

    model_config = ConfigDict(extra="forbid")

    proxy: str = Field(description="proxy model directory (HF config.json + safetensors + tokenizer)")
    profiles: dict[str, ProfileSpec] = Field(
        description="profile name → gradient path, or {gradient, epsilon}", min_length=1
    )
    default_profile: str | None = Field(None, description="profile used when a request names none")
    epsilon: float = Field(1e-3, gt=0, description="finite-difference step ε (calibrate per proxy and dtype)")
    proxy_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    token_budget: int = Field(16384, ge=16, description="proxy KV tokens per profile, preallocated")
    proxy_attention: Literal["reference", "flex", "auto"] = Field(  # core.plan.ATTENTION_PATHS (torch-free here)
        "reference",
        description="proxy attention: gather the paged KV per layer, read it in place (FlexAttention), "
        "or in place for big decode groups only (auto)",
    )
    max_lambda: float = Field(50.0, ge=0, description="largest ad_lambda a request may ask for")
    allowed_modes: list[Mode] = Field(default_factory=lambda: ["ad"])
    permutation_seed: int = 0
    check_tokenizer: bool = Field(True, description="refuse a proxy whose tokens differ from the teacher's")

    @field_validator("profiles", mode="before")
    @classmethod
    def _names(cls, profiles: Any) -> Any:
        if not isinstance(profiles, dict):
            return profiles
        for name in profiles:
            if not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"profile name {name!r} must be letters, digits, '-' or '_'")
        return {k: {"gradient": v} if isinstance(v, str) else v for k, v in profiles.items()}

    @model_validator(mode="after")
    def _default(self) -> ProcessorSettings:
        for spec in self.profiles.values():
            spec.epsilon = spec.epsilon or self.epsilon
        if self.default_profile is None:
            self.default_profile = next(iter(self.profiles))
        elif self.default_profile not in self.profiles:
            raise ValueError(f"default_profile {self.default_profile!r} is not one of {sorted(self.profiles)}")
        if "ad" not in self.allowed_modes:
            raise ValueError("allowed_modes must include 'ad'")
        return self


def one_line(exc: ValidationError) -> str:
    """The first pydantic error as ``field.path: message``: start-up errors are one line each."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    return f"{field}: {first['msg']}"


def parse_settings(raw: Any, source: str) -> ProcessorSettings:
    try:
        return ProcessorSettings.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError(f"{source}: {one_line(exc)}") from None


def _from_env() -> Any | None:
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    text = value if value.lstrip().startswith("{") else Path(value).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{ENV_VAR}: invalid JSON ({exc})") from None


def load_settings(additional_config: Mapping[str, Any] | None = None) -> ProcessorSettings:
    """Settings from ``ANTIDISTILL_CONFIG`` and/or the engine's ``--additional-config``.

    Both may be given (``antidistill serve`` sets both) but must then agree: the API server
    validates requests against the one it sees and the worker serves with the other.
    """
    from_config = None
    if additional_config and CONFIG_KEY in additional_config:
        from_config = parse_settings(additional_config[CONFIG_KEY], f"--additional-config {CONFIG_KEY}")
    raw = _from_env()
    from_env = None
    if raw is not None:
        from_env = parse_settings(raw.get(CONFIG_KEY, raw) if isinstance(raw, dict) else raw, ENV_VAR)
    if from_config is not None and from_env is not None and from_config != from_env:
        raise SettingsError(f"{ENV_VAR} and --additional-config {CONFIG_KEY} disagree; give one, or the same")
    settings = from_config or from_env
    if settings is None:
        raise SettingsError(
            f"antidistillation processor is not configured: set {ENV_VAR} (a JSON file or string; the "
            f"API server needs it to validate requests) or pass --additional-config '{{\"{CONFIG_KEY}\": ...}}'"
        )
    return settings


@dataclass(frozen=True)
class RequestArgs:
    """What one request asked for, already validated.

    ``ticket`` names the request in the failure ledger (set by the gateway); ``on_failure`` says
    what a step without Δ does: ``refuse`` (the default) never lets the row sample from the raw
    teacher, ``degrade`` serves it with Δ = 0 while the failure is transient, for a bounded number
    of steps (``protection.DEGRADE_STEPS``); both are recorded in the ledger. ``salt`` (set by the
    gateway: a keyed digest of the account) scopes the proxy's prefix cache to one tenant, so a
    request never reuses, or learns the presence of, another tenant's proxy KV. ``tier`` (set by
    the gateway) labels the worker's dose metric; it changes nothing about the step.
    """

    lam: float = 0.0
    profile: str = ""
    mode: Mode = "ad"
    ticket: int | None = None
    on_failure: OnFailure = "refuse"
    salt: str | None = None
    tier: str = ""

    @property
    def protected(self) -> bool:
        return self.lam > 0

    def to_xargs(self) -> dict[str, Any]:
        """The ``vllm_xargs`` that ``parse_request_args`` reads back as these arguments: the one
        writer of REQUEST_KEYS (the gateway, the offline engine). Defaults are left out, so a
        request at λ = 0 carries ``ad_lambda`` alone."""
        values = (self.profile, self.mode, self.ticket, self.on_failure, self.salt, self.tier)
        named = zip(REQUEST_KEYS[1:], values, strict=True)
        return {"ad_lambda": self.lam, **{key: v for key, v in named if v != REQUEST_DEFAULTS[key]}}


def parse_request_args(extra_args: Mapping[str, Any] | None, settings: ProcessorSettings) -> RequestArgs:
    """Validate ``vllm_xargs`` → RequestArgs; ValueError names the field (HTTP 400 at admission)."""
    args = dict(extra_args or {})
    unknown = sorted(k for k in args if k.startswith("ad_") and k not in REQUEST_KEYS)
    if unknown:
        raise ValueError(
            f"vllm_xargs.{unknown[0]}: unknown antidistillation argument (known: {', '.join(REQUEST_KEYS)})"
        )
    lam = args.get("ad_lambda", 0.0)
    if isinstance(lam, bool) or not isinstance(lam, int | float):
        raise ValueError(f"vllm_xargs.ad_lambda: must be a number, got {type(lam).__name__}")
    if not math.isfinite(lam) or lam < 0 or lam > settings.max_lambda:
        raise ValueError(f"vllm_xargs.ad_lambda: must be finite and in [0, {settings.max_lambda:g}], got {lam!r}")
    profile = args.get("ad_profile", settings.default_profile)
    if not isinstance(profile, str) or profile not in settings.profiles:
        raise ValueError(f"vllm_xargs.ad_profile: unknown profile {profile!r} (loaded: {', '.join(settings.profiles)})")
    mode = args.get("ad_mode", "ad")
    if mode not in ("ad", "permutation"):
        raise ValueError(f"vllm_xargs.ad_mode: must be 'ad' or 'permutation', got {mode!r}")
    if mode not in settings.allowed_modes:
        raise ValueError(f"vllm_xargs.ad_mode: {mode!r} is not enabled on this server")
    on_failure = args.get("ad_on_failure", "refuse")
    if on_failure not in ("refuse", "degrade"):
        raise ValueError(f"vllm_xargs.ad_on_failure: must be 'refuse' or 'degrade', got {on_failure!r}")
    salt = args.get("ad_salt")
    if salt is not None and (not isinstance(salt, str) or not 0 < len(salt) <= MAX_SALT):
        shown = f"a string of {len(salt)} characters" if isinstance(salt, str) else type(salt).__name__
        raise ValueError(
            f"vllm_xargs.ad_salt: must be a non-empty string of at most {MAX_SALT} characters, got {shown}"
        )
    tier = args.get("ad_tier", "")
    if not isinstance(tier, str) or len(tier) > MAX_TIER:
        raise ValueError(f"vllm_xargs.ad_tier: must be a string of at most {MAX_TIER} characters")
    return RequestArgs(float(lam), profile, mode, ticket_of(args), on_failure, salt, tier)


def ticket_of(extra_args: Mapping[str, Any] | None) -> int | None:
    """The request's failure-ledger ticket; ValueError when it is not one (the gateway's are)."""
    ticket = (extra_args or {}).get("ad_ticket")
    if ticket is None:
        return None
    if isinstance(ticket, bool) or not isinstance(ticket, int) or not 0 < ticket <= MAX_TICKET:
        raise ValueError(f"vllm_xargs.ad_ticket: must be an integer in [1, 2**63), got {ticket!r}")
    return ticket
