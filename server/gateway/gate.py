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
from antidistill.server.gateway.apis.responses import Owner
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
        headers: Requested,
        max_model_len: int | None,
    ) -> tuple[Admission, Lease]:
        """The decision and its lease (release it when the request ends); raises Refusal (400/403/429)."""
        scopes = scopes_for(caller, tiers.account(caller.account))
        decide = partial(
            admit,
            parsed,
            caller.tier_name,
            caller.tier,
            headers.lam,
            strength_header=headers.strength,
            scale=tiers.scales.scale(caller.tier.profile),
            max_model_len=max_model_len,
            tenant_key=self.tenant_key,
            tenant=tenant_of(caller),
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

    def owner(self, caller: Caller) -> Owner:
        """The caller as stored responses know it (the Responses API's ids carry its tag)."""
        return Owner.of(self.tenant_key, tenant_of(caller))


@dataclass(frozen=True)
class Requested:
    """What the client asked for in headers: λ, or strength (λ·s); each None when absent."""

    lam: str | None = None
    strength: str | None = None


def tenant_of(caller: Caller) -> str:
    """Whom prefix caches and stored responses are separated by: the account, else the key."""
    return f"account:{caller.account}" if caller.account is not None else f"key:{caller.scope_id}"


def higher(known: float | None, shared: float | None) -> float | None:
    """The higher of two escalation floors (None: not escalated)."""
    return shared if known is None else known if shared is None else max(known, shared)
