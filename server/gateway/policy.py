"""The λ policy: from the caller's tier and what the client asked for, the ``ad_*`` arguments the
engine will see — or a refusal. Pure functions: no I/O, no clocks (escalation is passed in).

A client's own λ (in ``vllm_xargs.ad_lambda`` or the ``X-Antidistillation-Lambda`` header) is only
a request: inside the tier's [min_lambda, max_lambda] it is used; anything else is refused. So is
any other ``ad_*`` key, and any attempt to smuggle one elsewhere in the body. Temperature plays no
part: greedy decoding is protected like any other (Δ is added before temperature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from antidistill.server.gateway.errors import Refusal
from antidistill.server.tiers import Tier

LAMBDA_HEADER = "x-antidistillation-lambda"
SMUGGLE_KEYS = ("ad_lambda", "ad_profile", "ad_mode")


@dataclass(frozen=True)
class Decision:
    lam: float
    profile: str | None


def _requested_lambda(xargs: dict[str, Any], header: str | None) -> float | None:
    values = []
    if "ad_lambda" in xargs:
        values.append(("vllm_xargs.ad_lambda", xargs["ad_lambda"]))
    if header is not None:
        values.append((LAMBDA_HEADER, header))
    lam = None
    for where, raw in values:
        try:
            value = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError, OverflowError):
            raise Refusal(400, f"{where}: must be a number, got {str(raw)[:40]!r}", where) from None
        if not math.isfinite(value):
            raise Refusal(400, f"{where}: must be finite, got {raw!r}", where)
        if lam is not None and value != lam:
            raise Refusal(400, f"vllm_xargs.ad_lambda and {LAMBDA_HEADER} disagree", where)
        lam = value
    return lam


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
    tier_name: str, tier: Tier, xargs: dict[str, Any], header: str | None, escalated: float | None = None
) -> Decision:
    """The λ and profile for this request, or Refusal (403: outside the tier's range)."""
    for key in xargs:
        if key.startswith("ad_") and key != "ad_lambda":
            raise Refusal(403, f"vllm_xargs.{key}: not allowed; the server chooses it from your tier", key)
    requested = _requested_lambda(xargs, header)
    floor = max(tier.min_lambda, escalated or 0.0)
    ceiling = max(tier.max_lambda, floor)
    if requested is None:
        lam = max(tier.lambda_, floor)
    elif floor <= requested <= ceiling:
        lam = requested
    else:
        raise Refusal(
            403,
            f"ad_lambda {requested:g} is outside tier {tier_name!r}'s allowed range [{floor:g}, {ceiling:g}]",
            "ad_lambda",
        )
    return Decision(lam, tier.profile)
