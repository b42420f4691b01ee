"""Rate limits (requests/min, tokens/min, in-flight) and adaptive escalation, per key and per account.

A request is counted against every *scope* it belongs to: its key (limits from the key's tier) and,
when the key names one, its account (limits from the tiers file's ``accounts`` section), so ten keys
of one customer share the account's budget and escalate together. This module holds the in-memory
state of one process (the default, and the fallback when shared state is unreachable:
server/gateway/limits/redis_state.py). Clocks are injected so tests are exact.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from antidistill.server.gateway import metrics
from antidistill.server.gateway.errors import Refusal
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
    scopes = [Scope(f"key:{caller.scope_id}", "", tier.rpm, tier.tpm, tier.max_concurrent, tier.escalation)]
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
    weight: int = 1  # sequences it runs (prompts × n): its share of rpm and in-flight slots
    admitted_ms: int = 0  # the shared store's clock at admission (its refund finds the bucket)


@dataclass(frozen=True)
class Grant:
    lease: Lease
    escalated: float | None  # λ floor from escalation (key or account), None if not escalated


class LimitState(Protocol):
    """What the gateway asks of limit state: one call to admit (counts + escalation), one to count
    output while a request runs, one to release."""

    def known_escalation(self, scopes: Sequence[Scope]) -> float | None:
        """Escalation this process already knows of (no I/O): the λ the first policy pass uses."""

    async def admit(self, scopes: Sequence[Scope], budget: int, weight: int = 1) -> Grant:
        """Count a request of ``budget`` tokens and ``weight`` sequences against every scope, or
        raise Refusal 429."""

    async def charge(self, lease: Lease, output_tokens: int) -> None:
        """Count output sent so far (while the request still runs), so that escalation sees a long
        stream before it ends — and a stream the client drops. Never raises."""

    async def release(self, lease: Lease, output_tokens: int, refund: bool = False) -> None:
        """Free the lease's slots and count its output not yet charged; ``refund`` also uncounts
        the request (admitted by the limits, then refused by the policy at the escalated λ). Never raises."""

    async def close(self) -> None: ...


@dataclass
class _Window:
    """Counted entries (time, amount, lease) with their running sum, so a check is O(1) amortised.
    ``bucket`` > 0 merges entries of one bucket of that many seconds (a window never removed by
    lease stays at most window / bucket entries, whatever the request rate)."""

    bucket: float = 0.0
    entries: deque[tuple[float, int, str]] = field(default_factory=deque)
    total: int = 0

    def add(self, when: float, amount: int, lease: str) -> None:
        if self.bucket and self.entries and self.entries[-1][0] // self.bucket == when // self.bucket:
            last = self.entries.pop()
            self.entries.append((last[0], last[1] + amount, ""))
        else:
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
    requests: _Window = field(default_factory=_Window)  # amount: the lease's weight
    tokens: _Window = field(default_factory=_Window)
    outputs: _Window = field(default_factory=lambda: _Window(bucket=MINUTE))
    in_flight: dict[str, int] = field(default_factory=dict)  # lease → weight
    escalated_until: float = 0.0

    def idle(self, now: float) -> bool:
        return not (self.requests.entries or self.tokens.entries or self.outputs.entries or self.in_flight) and (
            now >= self.escalated_until
        )


class LocalLimits:
    """Sliding windows in this process's memory (synchronous, no I/O). A scope records only what
    one of its limits reads, and a scope with nothing left to remember is forgotten, so no request
    pattern (nor any number of distinct keys or signed accounts) makes the state grow without bound."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._scopes: dict[str, _ScopeState] = {}

    def admit(
        self, scopes: Sequence[Scope], budget: int, lease: str, enforce: bool = True, weight: int = 1
    ) -> float | None:
        """Count the request under ``lease`` (refusing with 429 first if ``enforce``); returns the
        escalated λ. ``enforce=False`` mirrors a request the shared store admitted."""
        now = self.clock()
        escalated = self.escalation(scopes)
        states = [(scope, self._expired(scope.id, now)) for scope in scopes]
        if enforce:
            for scope, s in states:
                _check(scope, s, budget, weight, now)
        for scope, s in states:
            if scope.rpm is not None:
                s.requests.add(now, weight, lease)
            if scope.tpm is not None:
                s.tokens.add(now, budget, lease)
            if scope.max_concurrent is not None:
                s.in_flight[lease] = weight
        self._forget_idle(scopes, now)
        return escalated

    def charge(self, lease: Lease, output_tokens: int) -> None:
        now = self.clock()
        for scope in lease.scopes:
            if output_tokens > 0 and scope.escalation is not None:
                self._state(scope.id).outputs.add(now, output_tokens, lease.id)

    def release(self, lease: Lease, output_tokens: int, refund: bool = False) -> None:
        self.charge(lease, output_tokens)
        now = self.clock()
        for scope in lease.scopes:
            s = self._scopes.get(scope.id)
            if s is None:
                continue
            s.in_flight.pop(lease.id, None)
            if refund:
                s.requests.remove(lease.id)
                s.tokens.remove(lease.id)
        self._forget_idle(lease.scopes, now)

    def escalation(self, scopes: Sequence[Scope]) -> float | None:
        """The highest escalated λ among ``scopes`` whose last hour looks like harvesting."""
        now, lam = self.clock(), None
        for scope in scopes:
            rule, s = scope.escalation, self._scopes.get(scope.id)
            if rule is None or s is None:
                continue
            if s.outputs.expire(now - HOUR) > rule.tokens_per_hour:
                s.escalated_until = max(s.escalated_until, now + rule.decay_minutes * MINUTE)
            if now < s.escalated_until:
                lam = rule.lambda_ if lam is None else max(lam, rule.lambda_)
        return lam

    def hold_escalation(self, scope_id: str, seconds: float) -> None:
        """Remember an escalation the shared store reported, so an outage cannot lower λ."""
        s = self._state(scope_id)
        s.escalated_until = max(s.escalated_until, self.clock() + seconds)

    def scope_count(self) -> int:
        """Scopes remembered (bounded state: tests read it)."""
        return len(self._scopes)

    def _state(self, scope_id: str) -> _ScopeState:
        return self._scopes.setdefault(scope_id, _ScopeState())

    def _expired(self, scope_id: str, now: float) -> _ScopeState:
        s = self._state(scope_id)
        s.requests.expire(now - MINUTE)
        s.tokens.expire(now - MINUTE)
        s.outputs.expire(now - HOUR)
        return s

    def _forget_idle(self, scopes: Sequence[Scope], now: float) -> None:
        for scope in scopes:
            s = self._scopes.get(scope.id)
            if s is not None and s.idle(now):
                del self._scopes[scope.id]


class MemoryState:
    """Limit state of one process (the default without ``--state``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.local = LocalLimits(clock)
        metrics.set_state_mode("memory")

    def known_escalation(self, scopes: Sequence[Scope]) -> float | None:
        return self.local.escalation(scopes)

    async def admit(self, scopes: Sequence[Scope], budget: int, weight: int = 1) -> Grant:
        lease = new_lease(scopes, budget, weight=weight)
        return Grant(lease, self.local.admit(scopes, budget, lease.id, weight=weight))

    async def charge(self, lease: Lease, output_tokens: int) -> None:
        self.local.charge(lease, output_tokens)

    async def release(self, lease: Lease, output_tokens: int, refund: bool = False) -> None:
        self.local.release(lease, output_tokens, refund)

    async def close(self) -> None:
        return None


def new_lease(scopes: Sequence[Scope], budget: int, shared: bool = False, weight: int = 1) -> Lease:
    return Lease(uuid.uuid4().hex, tuple(scopes), budget, shared, max(weight, 1))


def too_many(scope: Scope, kind: str, limit: int, retry_after: float, used: int = 0, asked: int = 1) -> Refusal:
    """The 429 for ``scope`` exceeding ``kind`` ("concurrent", "rpm", "tpm"): one wording for both
    states. ``asked`` is the request's share: its sequences (prompts × n), or its tokens for tpm."""
    sequences = f" (this request runs {asked} sequences: prompts × n)" if asked > 1 else ""
    what = {
        "concurrent": f"more than {limit} concurrent requests{sequences}",
        "rpm": f"more than {limit} requests per minute{sequences}",
        "tpm": f"more than {limit} tokens per minute ({used} used, {asked} asked)",
    }[kind]
    return Refusal(429, f"rate limit: {scope.label}{what}", None, max(1, math.ceil(retry_after)))


def _check(scope: Scope, s: _ScopeState, budget: int, weight: int, now: float) -> None:
    if scope.max_concurrent is not None and sum(s.in_flight.values()) + weight > scope.max_concurrent:
        raise too_many(scope, "concurrent", scope.max_concurrent, 1.0, asked=weight)
    if scope.rpm is not None and s.requests.total + weight > scope.rpm:
        wait = s.requests.entries[0][0] + MINUTE - now if s.requests.entries else MINUTE
        raise too_many(scope, "rpm", scope.rpm, wait, asked=weight)
    used = s.tokens.total
    if scope.tpm is not None and used + budget > scope.tpm:
        wait = s.tokens.entries[0][0] + MINUTE - now if s.tokens.entries else MINUTE
        raise too_many(scope, "tpm", scope.tpm, wait, used, budget)
