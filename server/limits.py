"""Rate limits (requests/min, tokens/min, in-flight) and adaptive escalation, per key and per account.

A request is counted against every *scope* it belongs to: its key (limits from the key's tier) and,
when the key names one, its account (limits from the tiers file's ``accounts`` section), so ten keys
of one customer share the account's budget and escalate together. This module holds the in-memory
state of one process (the default, and the fallback when shared state is unreachable:
server/shared_limits.py). Clocks are injected so tests are exact.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from antidistill.server import metrics
from antidistill.server.policy import PolicyError
from antidistill.server.tiers import Account, Caller, Escalation

MINUTE, HOUR = 60.0, 3600.0


@dataclass(frozen=True)
class Scope:
    """One budget holder: a key or an account, with the limits that apply to it."""

    id: str  # "key:<key_id>" or "account:<name>": the state's name for it
    label: str  # prefix of a 429 message ("" for the key itself)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    escalation: Escalation | None = None


def scopes_for(caller: Caller, account: Account | None) -> tuple[Scope, ...]:
    """The key's scope (its tier's limits) and, if it names an account, the account's."""
    tier = caller.tier
    scopes = [Scope(f"key:{caller.key_id}", "", tier.rpm, tier.tpm, tier.max_concurrent, tier.escalation)]
    if caller.account is not None:
        a = account or Account()
        label = f"account {caller.account!r}: "
        scopes.append(Scope(f"account:{caller.account}", label, a.rpm, a.tpm, a.max_concurrent, a.escalation))
    return tuple(scopes)


@dataclass(frozen=True)
class Lease:
    """An admitted request's hold on its scopes' in-flight slots, until released (or expired)."""

    id: str
    scopes: tuple[Scope, ...]
    budget: int  # tokens counted against tpm
    shared: bool = False  # held in the shared store too (it must be released there)


@dataclass(frozen=True)
class Grant:
    lease: Lease
    escalated: float | None  # λ floor from escalation (key or account), None if not escalated


class LimitState(Protocol):
    """What the gateway asks of limit state: one call to admit (counts + escalation), one to release."""

    def known_escalation(self, scopes: Sequence[Scope]) -> float | None:
        """Escalation this process already knows of (no I/O): the λ the first policy pass uses."""

    async def admit(self, scopes: Sequence[Scope], budget: int) -> Grant:
        """Count a request of ``budget`` tokens against every scope, or raise PolicyError 429."""

    async def release(self, lease: Lease, output_tokens: int, refund: bool = False) -> None:
        """Free the lease's slots and count its output; ``refund`` also uncounts the request
        (admitted by the limits, then refused by the policy at the escalated λ). Never raises."""

    async def close(self) -> None: ...


@dataclass
class _Window:
    """Counted entries (time, amount, lease) with their running sum, so a check is O(1) amortised."""

    entries: deque[tuple[float, int, str]] = field(default_factory=deque)
    total: int = 0

    def add(self, when: float, amount: int, lease: str) -> None:
        self.entries.append((when, amount, lease))
        self.total += amount

    def expire(self, horizon: float) -> int:
        while self.entries and self.entries[0][0] <= horizon:
            self.total -= self.entries.popleft()[1]
        return self.total

    def remove(self, lease: str) -> None:
        kept = deque(e for e in self.entries if e[2] != lease)
        self.total -= sum(e[1] for e in self.entries if e[2] == lease)
        self.entries = kept


@dataclass
class _ScopeState:
    requests: _Window = field(default_factory=_Window)  # amount 1 each
    tokens: _Window = field(default_factory=_Window)
    outputs: _Window = field(default_factory=_Window)
    in_flight: set[str] = field(default_factory=set)
    escalated_until: float = 0.0


class LocalLimits:
    """Sliding windows in this process's memory (synchronous, no I/O)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._scopes: dict[str, _ScopeState] = defaultdict(_ScopeState)

    def admit(self, scopes: Sequence[Scope], budget: int, lease: str, enforce: bool = True) -> float | None:
        """Count the request under ``lease`` (refusing with 429 first if ``enforce``); returns the
        escalated λ. ``enforce=False`` mirrors a request the shared store admitted."""
        now = self.clock()
        escalated = self.escalation(scopes)
        states = [(scope, self._expired(scope.id, now)) for scope in scopes]
        if enforce:
            for scope, s in states:
                _check(scope, s, budget, now)
        for _, s in states:
            s.requests.add(now, 1, lease)
            s.tokens.add(now, budget, lease)
            s.in_flight.add(lease)
        return escalated

    def release(self, lease: Lease, output_tokens: int, refund: bool = False) -> None:
        now = self.clock()
        for scope in lease.scopes:
            s = self._scopes[scope.id]
            s.in_flight.discard(lease.id)
            if output_tokens:
                s.outputs.add(now, output_tokens, lease.id)
            if refund:
                s.requests.remove(lease.id)
                s.tokens.remove(lease.id)

    def escalation(self, scopes: Sequence[Scope]) -> float | None:
        """The highest escalated λ among ``scopes`` whose last hour looks like harvesting."""
        now, lam = self.clock(), None
        for scope in scopes:
            rule = scope.escalation
            if rule is None:
                continue
            s = self._scopes[scope.id]
            if s.outputs.expire(now - HOUR) > rule.tokens_per_hour:
                s.escalated_until = max(s.escalated_until, now + rule.decay_minutes * MINUTE)
            if now < s.escalated_until:
                lam = rule.lambda_ if lam is None else max(lam, rule.lambda_)
        return lam

    def hold_escalation(self, scope_id: str, seconds: float) -> None:
        """Remember an escalation the shared store reported, so an outage cannot lower λ."""
        s = self._scopes[scope_id]
        s.escalated_until = max(s.escalated_until, self.clock() + seconds)

    def _expired(self, scope_id: str, now: float) -> _ScopeState:
        s = self._scopes[scope_id]
        s.requests.expire(now - MINUTE)
        s.tokens.expire(now - MINUTE)
        return s


class MemoryState:
    """Limit state of one process (the default without ``--state``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.local = LocalLimits(clock)
        metrics.set_state_mode("memory")

    def known_escalation(self, scopes: Sequence[Scope]) -> float | None:
        return self.local.escalation(scopes)

    async def admit(self, scopes: Sequence[Scope], budget: int) -> Grant:
        lease = new_lease(scopes, budget)
        return Grant(lease, self.local.admit(scopes, budget, lease.id))

    async def release(self, lease: Lease, output_tokens: int, refund: bool = False) -> None:
        self.local.release(lease, output_tokens, refund)

    async def close(self) -> None:
        return None


def new_lease(scopes: Sequence[Scope], budget: int, shared: bool = False) -> Lease:
    return Lease(uuid.uuid4().hex, tuple(scopes), budget, shared)


def too_many(scope: Scope, kind: str, limit: int, retry_after: float, used: int = 0, asked: int = 0) -> PolicyError:
    """The 429 for ``scope`` exceeding ``kind`` ("concurrent", "rpm", "tpm"): one wording for both states."""
    what = {
        "concurrent": f"more than {limit} concurrent requests",
        "rpm": f"more than {limit} requests per minute",
        "tpm": f"more than {limit} tokens per minute ({used} used, {asked} asked)",
    }[kind]
    return PolicyError(429, f"rate limit: {scope.label}{what}", None, max(1, math.ceil(retry_after)))


def _check(scope: Scope, s: _ScopeState, budget: int, now: float) -> None:
    if scope.max_concurrent is not None and len(s.in_flight) >= scope.max_concurrent:
        raise too_many(scope, "concurrent", scope.max_concurrent, 1.0)
    if scope.rpm is not None and s.requests.total >= scope.rpm:
        raise too_many(scope, "rpm", scope.rpm, s.requests.entries[0][0] + MINUTE - now)
    used = s.tokens.total
    if scope.tpm is not None and used + budget > scope.tpm:
        wait = s.tokens.entries[0][0] + MINUTE - now if s.tokens.entries else MINUTE
        raise too_many(scope, "tpm", scope.tpm, wait, used, budget)
