"""The λ policy: from the caller's tier and what the client asked for, the ``ad_*`` arguments the
engine will see — or a refusal. Pure functions: no I/O, no clocks (escalation is passed in).

A client's own λ (in ``vllm_xargs.ad_lambda`` or the ``X-Antidistillation-Lambda`` header), or its
strength λ·s (``vllm_xargs.ad_strength`` or ``X-Antidistillation-Strength``, s the Δ scale of the
tier's gradient), is only a request: inside the tier's [min_lambda, max_lambda] it is used; anything
else is refused. So is any other ``ad_*`` key, and any attempt to smuggle one elsewhere in the body.
Temperature plays no part: greedy decoding is protected like any other (Δ is added before
temperature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from antidistill.proxy_worker.core.strength import lambda_for, strength_of
from antidistill.server.gateway.errors import Refusal
from antidistill.server.tiers import Tier

LAMBDA_HEADER = "x-antidistillation-lambda"
STRENGTH_HEADER = "x-antidistillation-strength"
SMUGGLE_KEYS = ("ad_lambda", "ad_strength", "ad_profile", "ad_mode")
CLIENT_KEYS = ("ad_lambda", "ad_strength")  # the vllm_xargs a client may send: requests, not orders
AGREE_REL_TOL = 1e-9  # an ad_strength and an ad_lambda agree if λ·s equals the strength this closely


@dataclass(frozen=True)
class Decision:
    lam: float
    profile: str | None


@dataclass(frozen=True)
class Requested:
    """A number the client asked for, and where it said so (for the refusal that names it)."""

    value: float
    where: str


@dataclass(frozen=True)
class Ask:
    """The λ a client asked for, and the strength it asked it as (None: it asked in λ)."""

    lam: float
    strength: float | None = None


def _number(where: str, raw: Any) -> float:
    """``raw`` as a finite float, or a 400 naming ``where`` (a bool is not a number here)."""
    try:
        value = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        raise Refusal(400, f"{where}: must be a number, got {str(raw)[:40]!r}", where) from None
    if not math.isfinite(value):
        raise Refusal(400, f"{where}: must be finite, got {raw!r}", where)
    return value


def _requested(key: str, header_name: str, xargs: dict[str, Any], header: str | None) -> Requested | None:
    """The value of ``vllm_xargs.<key>`` and/or its header; both given must be equal (400 if not)."""
    spelled = [(f"vllm_xargs.{key}", xargs[key])] if key in xargs else []
    if header is not None:
        spelled.append((header_name, header))
    found: Requested | None = None
    for where, raw in spelled:
        value = _number(where, raw)
        if found is not None and value != found.value:
            raise Refusal(400, f"vllm_xargs.{key} and {header_name} disagree", where)
        found = Requested(value, where)
    return found


def _requested_lambda(
    tier_name: str,
    tier: Tier,
    xargs: dict[str, Any],
    header: str | None,
    strength_header: str | None,
    scale: float | None,
) -> Ask | None:
    """The λ the client asked for, in either unit; a strength needs the profile's Δ scale, and a λ
    given beside it must be the same request (λ·s = strength) — else one of them would be ignored."""
    lam = _requested("ad_lambda", LAMBDA_HEADER, xargs, header)
    strength = _requested("ad_strength", STRENGTH_HEADER, xargs, strength_header)
    if strength is None:
        return None if lam is None else Ask(lam.value)
    if scale is None:
        profile = tier.profile or "(default)"
        raise Refusal(
            400,
            f"{strength.where}: tier {tier_name!r}'s gradient profile {profile!r} has no Δ scale, "
            "request ad_lambda instead",
            strength.where,
        )
    if lam is None:
        return Ask(lambda_for(strength.value, scale), strength.value)
    if not math.isclose(strength_of(lam.value, scale), strength.value, rel_tol=AGREE_REL_TOL):
        raise Refusal(
            400,
            f"{strength.where} {strength.value:g} and {lam.where} {lam.value:g} disagree "
            f"(λ·s = {strength_of(lam.value, scale):g} at Δ scale {scale:g})",
            strength.where,
        )
    return Ask(lam.value, strength.value)


def _out_of_range(tier_name: str, tier: Tier, ask: Ask, low: float, high: float, scale: float | None) -> str:
    """The refusal for ``ask`` outside λ [low, high], in the unit the client asked in, and in strength
    too where the tier was written in strength (so the operator's own numbers appear)."""
    where = f"tier {tier_name!r}'s allowed"
    if ask.strength is not None and scale is not None:
        s_low, s_high = strength_of(low, scale), strength_of(high, scale)
        return (
            f"ad_strength {ask.strength:g} is outside {where} strength range [{s_low:g}, {s_high:g}] "
            f"(λ [{low:.3g}, {high:.3g}])"
        )
    message = f"ad_lambda {ask.lam:g} is outside {where} range [{low:g}, {high:g}]"
    if tier.in_strength and scale is not None:
        message += f" (strength [{strength_of(low, scale):g}, {strength_of(high, scale):g}])"
    return message


def find_smuggled(body: Any, path: str = "") -> str | None:
    """Path of an ``ad_*`` control key anywhere in the body except top-level ``vllm_xargs``."""
    if isinstance(body, dict):
        for key, value in body.items():
            here = f"{path}.{key}" if path else str(key)
            if here == "vllm_xargs":
                continue
            if isinstance(key, str) and key.lower() in SMUGGLE_KEYS:
                return here
            found = find_smuggled(value, here)
            if found:
                return found
    elif isinstance(body, list):
        for i, value in enumerate(body):
            found = find_smuggled(value, f"{path}[{i}]")
            if found:
                return found
    return None


def decide(
    tier_name: str,
    tier: Tier,
    xargs: dict[str, Any],
    header: str | None,
    escalated: float | None = None,
    *,
    strength_header: str | None = None,
    scale: float | None = None,
) -> Decision:
    """The λ and profile for this request, or Refusal (403: outside the tier's range; 400: a request
    that is not a number, contradicts itself, or asks in strength on a gradient with no Δ scale).
    ``scale`` is the Δ scale s of the tier's profile (None: its gradient stores none)."""
    for key in xargs:
        if key.startswith("ad_") and key not in CLIENT_KEYS:
            raise Refusal(403, f"vllm_xargs.{key}: not allowed; the server chooses it from your tier", key)
    ask = _requested_lambda(tier_name, tier, xargs, header, strength_header, scale)
    floor = max(tier.min_lambda, escalated or 0.0)
    ceiling = max(tier.max_lambda, floor)
    asked = None if ask is None else ask.lam if ask.strength is None else snap_to_bounds(ask.lam, floor, ceiling)
    if asked is None:
        lam = max(tier.lambda_, floor)
    elif floor <= asked <= ceiling:
        lam = asked
    else:
        param = "ad_lambda" if ask.strength is None else "ad_strength"
        raise Refusal(403, _out_of_range(tier_name, tier, ask, floor, ceiling, scale), param)
    return Decision(lam, tier.profile)


def snap_to_bounds(lam: float, floor: float, ceiling: float, rel: float = AGREE_REL_TOL) -> float:
    """A λ converted from a strength (b / s) that lands within rounding of a bound given in λ is that
    bound: asking for exactly the tier's ceiling in strength units must not be refused by one ulp.
    Only ever moves a value onto a bound, never past it."""
    for bound in (floor, ceiling):
        if math.isclose(lam, bound, rel_tol=rel, abs_tol=0.0):
            return bound
    return lam


def watermarking(tier: Tier, requested: bool | None) -> bool | None:
    """The ``watermarking`` field to forward to vLLM: the tier decides whether a client may opt out
    of the server's watermark (enforce: never; off: always off; allow: the client's value as sent)."""
    if tier.watermark == "enforce":
        return True
    if tier.watermark == "off":
        return False
    return requested
