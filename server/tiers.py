"""API-key tiers: who the caller is decides λ.

The tiers file (YAML) maps API keys — stored only as SHA-256 hashes — to tiers; each tier says
which λ is applied by default, the floor a client may not go below, the ceiling, the gradient
profile, and optional limits. It is validated with pydantic; errors name the field.

A tier gives its protection either as λ (``lambda``, ``min_lambda``, ``max_lambda``) or as a
strength (``strength``, ``min_strength``, ``max_strength``): λ·s, where s is the Δ scale stored in
the tier's gradient file (core/strength.py). A strength means the same on any gradient; it is turned
into λ = strength / s when the file is loaded, so everything after loading works in λ.

    tiers:
      free:     {strength: 1.0, max_strength: 2.0, profile: math, rpm: 20, max_tokens: 512, max_logprobs: 0}
      pro:      {lambda: 1.0, min_lambda: 0.5, max_lambda: 3.0, on_protection_failure: degrade, watermark: enforce}
      internal: {lambda: 0.0}
      anonymous: {lambda: 5.0, rpm: 5}     # optional: serves requests that carry no key
    keys:
      - {sha256: 9f86d0..., tier: pro, name: acme}
      - {sha256: 2c26b4..., tier: free, revoked: true}
      - {sha256: 5e8848..., tier: pro, account: acme}   # keys of one account share its limits
    accounts:                                           # optional: limits across all of an account's keys
      acme: {rpm: 600, max_concurrent: 32, escalation: {tokens_per_hour: 200000, lambda: 4.0}}
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from antidistill.proxy_worker.core.strength import ProfileScales, lambda_for
from antidistill.proxy_worker.runtime.settings import one_line
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

ANONYMOUS = "anonymous"
DEFAULT_MAX_LOGPROBS = 20  # unprotected (λ = 0) requests on a tier that sets no max_logprobs
KEY_PREFIX = "ad-"


class TiersError(ValueError):
    """The tiers file is missing or invalid; the message names the file and field."""


class Escalation(BaseModel):
    """Raise λ for a key whose recent output volume looks like harvesting, then decay back."""

    model_config = ConfigDict(extra="forbid")

    tokens_per_hour: int = Field(gt=0, description="output tokens in the last hour that trigger escalation")
    lambda_: float = Field(alias="lambda", ge=0, description="λ applied while escalated")
    decay_minutes: float = Field(60.0, gt=0, description="how long escalation lasts after volume drops")


@dataclass(frozen=True)
class SideChannels:
    """The raw-distribution channels one request may use (logprobs per token, prompt logprobs)."""

    max_logprobs: int
    prompt_logprobs: bool


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    lambda_: float | None = Field(None, alias="lambda", ge=0, description="λ applied when the client asks for none")
    min_lambda: float | None = Field(None, ge=0, description="floor a client may request (default: lambda)")
    max_lambda: float | None = Field(None, ge=0, description="ceiling a client may request (default: lambda)")
    strength: float | None = Field(None, ge=0, description="instead of lambda: λ·s, s the profile's Δ scale")
    min_strength: float | None = Field(None, ge=0, description="instead of min_lambda (default: strength)")
    max_strength: float | None = Field(None, ge=0, description="instead of max_lambda (default: strength)")
    profile: str | None = Field(None, description="gradient profile (default: the server's default)")
    rpm: int | None = Field(None, gt=0, description="requests per minute per key")
    tpm: int | None = Field(None, gt=0, description="tokens (prompt + max_tokens) per minute per key")
    max_tokens: int | None = Field(None, gt=0, description="cap on a request's max_tokens")
    max_concurrent: int | None = Field(None, gt=0, description="in-flight requests per key")
    max_logprobs: int | None = Field(
        None, ge=0, description="cap on logprobs/top_logprobs (default: 0 at λ > 0, 20 at λ = 0; 0 while escalated)"
    )
    allow_prompt_logprobs: bool | None = Field(
        None, description="prompt_logprobs / echo+logprobs (default: at λ = 0 only; never while escalated)"
    )
    allow_priority: bool = Field(False, description="clients may set vLLM's scheduling priority (priority ≠ 0)")
    escalation: Escalation | None = None
    on_protection_failure: Literal["refuse", "degrade"] = Field(
        "refuse",
        description="a protected request whose Δ cannot be computed: refused (503), or served with Δ = 0, flagged",
    )
    watermark: Literal["enforce", "allow", "off"] = Field(
        "allow",
        description="vLLM's watermark (--watermark-config): enforce = every request watermarked whatever the "
        "client sends; off = never; allow = the client's watermarking field as sent",
    )

    @model_validator(mode="after")
    def _range(self, info: ValidationInfo) -> Tier:
        if self.strength is not None or self.min_strength is not None or self.max_strength is not None:
            self._from_strength(info.context if isinstance(info.context, ProfileScales) else ProfileScales())
        if self.lambda_ is None:
            raise ValueError("needs lambda (λ) or strength (λ·s)")
        self.min_lambda = self.lambda_ if self.min_lambda is None else self.min_lambda
        self.max_lambda = self.lambda_ if self.max_lambda is None else self.max_lambda
        if not self.min_lambda <= self.lambda_ <= self.max_lambda:
            raise ValueError(
                f"need min_lambda ≤ lambda ≤ max_lambda, got {self.min_lambda}, {self.lambda_}, {self.max_lambda}"
            )
        return self

    @property
    def in_strength(self) -> bool:
        """The operator wrote this tier in strength units, so refusals name its range in them too."""
        return self.strength is not None

    def side_channels(self, lam: float, escalated: bool) -> SideChannels:
        """What a request served at ``lam`` may read of the teacher's distribution. The defaults follow
        the decided λ, not the tier's floor: a floor-0 tier's request at λ > 0 gets the protected
        defaults, and an escalated key (suspected harvesting) gets none of them whatever the tier says."""
        if escalated:
            return SideChannels(0, False)
        logprobs = self.max_logprobs if self.max_logprobs is not None else (0 if lam > 0 else DEFAULT_MAX_LOGPROBS)
        prompt = self.allow_prompt_logprobs if self.allow_prompt_logprobs is not None else lam == 0
        return SideChannels(logprobs, prompt)

    def _from_strength(self, scales: ProfileScales) -> None:
        """Set the λ fields from the strength fields: λ = strength / s of this tier's profile."""
        if self.lambda_ is not None or self.min_lambda is not None or self.max_lambda is not None:
            raise ValueError("give lambda/min_lambda/max_lambda or strength/min_strength/max_strength, not both")
        if self.strength is None:
            raise ValueError("min_strength/max_strength need strength")
        low = self.strength if self.min_strength is None else self.min_strength
        high = self.strength if self.max_strength is None else self.max_strength
        if not low <= self.strength <= high:
            raise ValueError(f"need min_strength ≤ strength ≤ max_strength, got {low}, {self.strength}, {high}")
        profile = scales.profile(self.profile)
        if profile not in scales.scales:
            loaded = ", ".join(scales.scales) or "none"
            raise ValueError(f"strength needs a loaded gradient profile; {profile!r} is not one (loaded: {loaded})")
        scale = scales.scale(profile)
        if scale is None:
            raise ValueError(
                f"strength needs the Δ scale of gradient profile {profile or '(default)'!r}, and its file stores "
                f"none: {scales.missing_hint(profile)}"
            )
        self.lambda_, self.min_lambda, self.max_lambda = (lambda_for(b, scale) for b in (self.strength, low, high))
        self.min_strength, self.max_strength = low, high


class Account(BaseModel):
    """Limits and escalation over all keys that name this account (a customer with many keys)."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, gt=0, description="requests per minute, all of the account's keys together")
    tpm: int | None = Field(None, gt=0, description="tokens (prompt + max_tokens) per minute, all keys together")
    max_concurrent: int | None = Field(None, gt=0, description="in-flight requests, all keys together")
    escalation: Escalation | None = None
    tiers: list[str] | None = Field(
        None, description="trusted-gateway mode: the only tiers a gateway may sign for this account (403 otherwise)"
    )


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the API key")
    tier: str
    name: str | None = None
    account: str | None = Field(None, min_length=1, description="the account whose limits this key shares")
    revoked: bool = False


class TiersFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tiers: dict[str, Tier] = Field(min_length=1)
    keys: list[KeyEntry] = Field(default_factory=list)
    accounts: dict[str, Account] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_tiers(self) -> TiersFile:
        for i, key in enumerate(self.keys):
            if key.tier not in self.tiers:
                raise ValueError(f"keys.{i}.tier: unknown tier {key.tier!r} (defined: {', '.join(self.tiers)})")
            if key.account is not None and key.account not in self.accounts:
                defined = ", ".join(self.accounts) or "none"
                raise ValueError(f"keys.{i}.account: unknown account {key.account!r} (defined: {defined})")
        for name, account in self.accounts.items():
            unknown = [t for t in account.tiers or () if t not in self.tiers]
            if unknown:
                raise ValueError(
                    f"accounts.{name}.tiers: unknown tier {unknown[0]!r} (defined: {', '.join(self.tiers)})"
                )
        return self


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(a fresh API key, its SHA-256) — only the hash goes into the tiers file."""
    key = KEY_PREFIX + secrets.token_urlsafe(24)
    return key, hash_key(key)


@dataclass(frozen=True)
class Caller:
    """The identity a request was authenticated as."""

    key_id: str  # first 12 hex digits of the key's hash (safe to log), or "anonymous"
    tier_name: str
    tier: Tier | None  # None only for rejected (401) callers, which are audited too
    account: str | None = None  # the account whose limits and escalation the key shares
    digest: str = ""  # full-length id of the key (limit state's name for it); "" → key_id

    @property
    def scope_id(self) -> str:
        """The key's name in the limit state: the full digest, so no two keys can share a budget."""
        return self.digest or self.key_id


class TierTable:
    """Lookup from a presented API key to its caller; immutable (reload builds a new one). ``scales``
    are the loaded profiles' Δ scales: strengths were resolved with them, and reports use them."""

    def __init__(self, spec: TiersFile, source: str, scales: ProfileScales | None = None) -> None:
        self.spec = spec
        self.source = source
        self.scales = scales or ProfileScales()
        self._by_hash = {k.sha256: k for k in spec.keys}

    def profiles(self) -> set[str]:
        return {t.profile for t in self.spec.tiers.values() if t.profile}

    def identify(self, key: str | None) -> Caller | None:
        """The caller for ``key`` (None: no key); None if unknown or revoked (→ 401)."""
        if key is None:
            tier = self.spec.tiers.get(ANONYMOUS)
            return Caller(ANONYMOUS, ANONYMOUS, tier) if tier is not None else None
        entry = self._by_hash.get(hash_key(key))
        if entry is None or entry.revoked:
            return None
        return Caller(entry.sha256[:12], entry.tier, self.spec.tiers[entry.tier], entry.account, entry.sha256)

    def account(self, name: str | None) -> Account | None:
        """The limits of account ``name`` (None: no account, or one the tiers file does not define)."""
        return None if name is None else self.spec.accounts.get(name)


def load_tiers(path: str | Path, scales: ProfileScales | None = None) -> TierTable:
    """The tiers file at ``path``, validated; a ``strength`` is turned into λ with ``scales`` (a
    strength tier whose profile has no known Δ scale is a TiersError naming how to add it)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TiersError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise TiersError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None  # one line
    try:
        return TierTable(TiersFile.model_validate(raw, context=scales or ProfileScales()), str(path), scales)
    except ValidationError as exc:
        raise TiersError(f"{path}: {one_line(exc)}") from None
