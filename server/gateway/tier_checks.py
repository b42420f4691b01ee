"""Whether a tiers table can be served by the engine this server started: the one home of those
rules, run by ``antidistill serve`` before vLLM starts (server/startup/preflight.py) and by the gateway on
every tiers reload (SIGHUP), so a reloaded file cannot do what a start-up file could not.

A tiers file can be valid on its own and still unservable here: a tier on a gradient profile the
engine did not load, a λ above the engine's ``--max-lambda`` (every such request would be a 400), or,
under ``--logprobs-mode raw_*``, a protected tier allowed logprobs (they would be the raw teacher's
distribution: the protection's side channel). What the rules need from the engine is one small
``EngineLimits``, carried to the gateway in its configuration (server/gateway/config.py), so the gateway
imports none of the start-up modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from antidistill.proxy_worker.core.strength import ProfileScales
from antidistill.server.tiers import TiersError, TierTable, load_tiers


class TierCheckError(TiersError):
    """A valid tiers table this engine cannot serve; the message names the file, field and flag."""


@dataclass(frozen=True)
class EngineLimits:
    """What the engine was started with that bounds the tiers it can serve."""

    profiles: tuple[str, ...]  # the loaded gradient profiles (--gradient NAME=PATH)
    max_lambda: float  # --max-lambda: the largest λ the processor accepts
    logprobs_mode: str  # vLLM's --logprobs-mode, as vLLM parsed it

    def to_json(self) -> dict[str, object]:
        return {"profiles": list(self.profiles), "max_lambda": self.max_lambda, "logprobs_mode": self.logprobs_mode}

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> EngineLimits:
        """The inverse of ``to_json``; ValueError for anything else (the gateway does not start)."""
        if not isinstance(raw, Mapping):
            raise ValueError("engine limits: expected an object of profiles, max_lambda and logprobs_mode")
        profiles, lam, mode = raw.get("profiles"), raw.get("max_lambda"), raw.get("logprobs_mode")
        if not isinstance(profiles, list) or not all(isinstance(p, str) and p for p in profiles):
            raise ValueError("engine limits: profiles must be a list of profile names")
        if isinstance(lam, bool) or not isinstance(lam, int | float) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"engine limits: max_lambda must be a finite number ≥ 0, got {lam!r}")
        if not isinstance(mode, str) or not mode:
            raise ValueError(f"engine limits: logprobs_mode must be a vLLM logprobs mode, got {mode!r}")
        return cls(tuple(profiles), float(lam), mode)


def check_servable(tiers: TierTable, engine: EngineLimits) -> None:
    """Every start-up check of a tiers table against the engine; TierCheckError names the first problem."""
    check_profiles_and_lambda(tiers, engine.profiles, engine.max_lambda)
    check_logprobs_mode(tiers, engine.logprobs_mode)


def check_profiles_and_lambda(tiers: TierTable, profiles: tuple[str, ...], max_lambda: float) -> None:
    """Every tier on a loaded profile, and no λ it can be served at (its range, an escalation's λ,
    its accounts' escalation λ) above the engine's maximum: the processor would refuse each request."""
    for name, tier in tiers.spec.tiers.items():
        if tier.profile and tier.profile not in profiles:
            raise TierCheckError(
                f"{tiers.source}: tiers.{name}.profile: {tier.profile!r} is not a loaded --gradient "
                f"profile ({', '.join(profiles)})"
            )
        if tier.max_lambda > max_lambda:
            raise TierCheckError(
                f"{tiers.source}: tiers.{name}.max_lambda {tier.max_lambda:g} exceeds --max-lambda {max_lambda:g}"
            )
        if tier.escalation is not None and tier.escalation.lambda_ > max_lambda:
            raise TierCheckError(
                f"{tiers.source}: tiers.{name}.escalation.lambda {tier.escalation.lambda_:g} exceeds "
                f"--max-lambda {max_lambda:g}"
            )
    for name, account in tiers.spec.accounts.items():
        if account.escalation is not None and account.escalation.lambda_ > max_lambda:
            raise TierCheckError(
                f"{tiers.source}: accounts.{name}.escalation.lambda {account.escalation.lambda_:g} exceeds "
                f"--max-lambda {max_lambda:g}"
            )


def check_logprobs_mode(tiers: TierTable, mode: str) -> None:
    """Raw logprobs are the unprotected teacher's distribution: no protected tier may return them."""
    if not mode.startswith("raw"):
        return
    for name, tier in tiers.spec.tiers.items():
        if (tier.max_lambda > 0 or tier.escalation is not None) and tier.max_logprobs:
            raise TierCheckError(
                f"{tiers.source}: --logprobs-mode {mode} would hand protected tier {name!r} the raw teacher's logprobs "
                f"(max_logprobs {tier.max_logprobs}); use processed_logprobs or set its max_logprobs to 0"
            )


def load_servable(path: str | Path, scales: ProfileScales | None, engine: EngineLimits | None) -> TierTable:
    """The tiers file at ``path``, validated (``load_tiers``) and checked against ``engine`` (None:
    limits unknown, a gateway not started by ``antidistill serve``); TiersError names the problem."""
    tiers = load_tiers(path, scales)
    if engine is not None:
        check_servable(tiers, engine)
    return tiers
