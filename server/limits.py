"""Per-key rate limits (requests/min, tokens/min, in-flight) and adaptive escalation.

Sliding windows in memory, per API-server process: with several replicas behind a router each
enforces its own share (documented in the scaling guide). Clocks are injected so tests are exact.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from antidistill.server.policy import PolicyError
from antidistill.server.tiers import Tier

MINUTE, HOUR = 60.0, 3600.0


@dataclass
class _KeyState:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    outputs: deque[tuple[float, int]] = field(default_factory=deque)
    in_flight: int = 0
    escalated_until: float = 0.0


class KeyLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._keys: dict[str, _KeyState] = defaultdict(_KeyState)

    def admit(self, key_id: str, tier: Tier, tokens: int) -> None:
        """Count a request of ``tokens`` (prompt + max_tokens) or raise 429 with Retry-After."""
        now, s = self.clock(), self._keys[key_id]
        _expire(s.requests, now - MINUTE, lambda t: t)
        _expire(s.tokens, now - MINUTE, lambda e: e[0])
        if tier.max_concurrent is not None and s.in_flight >= tier.max_concurrent:
            raise _too_many(f"more than {tier.max_concurrent} concurrent requests", 1.0)
        if tier.rpm is not None and len(s.requests) >= tier.rpm:
            raise _too_many(f"more than {tier.rpm} requests per minute", s.requests[0] + MINUTE - now)
        used = sum(n for _, n in s.tokens)
        if tier.tpm is not None and used + tokens > tier.tpm:
            wait = s.tokens[0][0] + MINUTE - now if s.tokens else MINUTE
            raise _too_many(f"more than {tier.tpm} tokens per minute ({used} used, {tokens} asked)", wait)
        s.requests.append(now)
        s.tokens.append((now, tokens))
        s.in_flight += 1

    def release(self, key_id: str, output_tokens: int) -> None:
        now, s = self.clock(), self._keys[key_id]
        s.in_flight = max(0, s.in_flight - 1)
        if output_tokens:
            s.outputs.append((now, output_tokens))

    def escalated_lambda(self, key_id: str, tier: Tier) -> float | None:
        """λ floor from the tier's escalation rule, if this key's last hour looks like harvesting."""
        rule = tier.escalation
        if rule is None:
            return None
        now, s = self.clock(), self._keys[key_id]
        _expire(s.outputs, now - HOUR, lambda e: e[0])
        if sum(n for _, n in s.outputs) > rule.tokens_per_hour:
            s.escalated_until = now + rule.decay_minutes * MINUTE
        return rule.lambda_ if now < s.escalated_until else None


def _expire(window: deque, horizon: float, when: Callable) -> None:
    while window and when(window[0]) <= horizon:
        window.popleft()


def _too_many(message: str, retry_after: float) -> PolicyError:
    return PolicyError(429, f"rate limit: {message}", None, max(1, math.ceil(retry_after)))
