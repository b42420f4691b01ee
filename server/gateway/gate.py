"""The gate: one admission under the caller's limits and escalation, the only call the router makes
to decide a generation request.

Escalation raises a key's λ floor, and the limits that know of it may live in another replica (the
shared state). So the policy is decided with the escalation this process knows, the request is
counted in one round trip that also returns the escalation every replica knows, and only if that
is higher is the policy decided again — refunding the count if the higher floor refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

from antidistill.server.gateway.admission import Admission, admit
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.limits.memory import Lease, LimitState, scopes_for
from antidistill.server.gateway.request import Parsed
from antidistill.server.tiers import Caller, TierTable


@dataclass(frozen=True)
class Gate:
    """What admission needs besides the request: the limit state and the per-server settings."""

    limits: LimitState
    tenant_key: bytes | None  # GatewayConfig.tenant_salt_key
    refuse_seeds: bool = False  # GatewayConfig.refuse_seeds

    async def admit(
        self,
        parsed: Parsed,
        caller: Caller,
        tiers: TierTable,
        lambda_header: str | None,
        max_model_len: int | None,
    ) -> tuple[Admission, Lease]:
        """The decision and its lease (release it when the request ends); raises Refusal (400/403/429)."""
        scopes = scopes_for(caller, tiers.account(caller.account))
        decide = partial(
            admit,
            parsed,
            caller.tier_name,
            caller.tier,
            lambda_header,
            max_model_len=max_model_len,
            tenant_key=self.tenant_key,
            tenant=f"account:{caller.account}" if caller.account is not None else scopes[0].id,
            refuse_seeds=self.refuse_seeds,
        )
        known = self.limits.known_escalation(scopes)
        decided = decide(known)
        grant = await self.limits.admit(scopes, decided.budget, decided.weight)
        escalated = higher(known, grant.escalated)  # never lower than what this process knew
        if escalated != known:
            try:
                decided = decide(escalated)
            except Refusal:
                await self.limits.release(grant.lease, 0, refund=True)
                raise
        return replace(decided, strength=tiers.scales.strength(decided.lam, decided.profile)), grant.lease


def higher(known: float | None, shared: float | None) -> float | None:
    """The higher of two escalation floors (None: not escalated)."""
    return shared if known is None else known if shared is None else max(known, shared)
