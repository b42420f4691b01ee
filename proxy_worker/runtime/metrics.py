"""Worker-side Prometheus metrics: what protection costs, per profile.

They live in the engine's worker process; they reach the API server's ``/metrics`` through
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, which ``antidistill serve``
sets to a fresh directory before anything starts and removes on exit). Every name starts with
``antidistill_``.

The share of step time spent in the proxy is exported as two counters whose ratio is the share:
``rate(antidistill_proxy_seconds_total[1m]) / rate(antidistill_engine_step_seconds_total[1m])``,
where a step's time is the interval between consecutive processor calls while protected rows exist.

The dose served: each sampled protected token's full-g Δ (the Δ it was served with, read at the next
step, once the token is known) over the profile's Δ scale, per tier — the live counterpart of
``antidistill tune``'s dose (proxy_worker/tools/dose.py). The mean dose is
``delta(antidistill_sampled_delta_sum[5m]) / increase(antidistill_sampled_tokens_total[5m])``; near 0
on a λ > 0 tier, its strength buys nothing there. (The sum is a gauge: Δ can be negative, which a
counter, and a histogram's ``_sum``, cannot carry. Under tensor parallelism every rank counts the
same tokens: the mean is unchanged, the totals are per rank.)
"""

from __future__ import annotations

import time

import torch
from antidistill.proxy_worker.runtime.engine import KVUsage, StepResult
from prometheus_client import Counter, Gauge, Histogram

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DOSE_FLUSH_STEPS = 32  # steps between two device→host copies of the served Δ values

PROXY_STEP = Histogram(
    "antidistill_proxy_step_seconds",
    "Time of one proxy step (both perturbed copies) for one profile.",
    ["profile", "phase"],
    buckets=STEP_BUCKETS,
)
PROXY_TOKENS = Counter(
    "antidistill_proxy_tokens", "Tokens run through the proxy (each through both copies).", ["profile", "phase"]
)
PROTECTED_ROWS = Histogram(
    "antidistill_protected_rows", "Protected rows in one engine step, per profile.", ["profile"], buckets=ROW_BUCKETS
)
PROXY_SECONDS = Counter("antidistill_proxy_seconds", "Wall time spent in the antidistillation processor.")
STEP_SECONDS = Counter(
    "antidistill_engine_step_seconds", "Wall time of engine steps that had protected rows (processor call to call)."
)
FALLBACKS = Counter(
    "antidistill_delta_fallbacks",
    "Rows served with Δ = 0 for a step (non-finite Δ, KV budget, error).",
    ["profile", "reason"],
)
KV_USED = Gauge(
    "antidistill_proxy_kv_tokens_used",
    "Proxy KV-cache tokens held by live rows.",
    ["profile"],
    multiprocess_mode="livesum",
)
KV_CAPACITY = Gauge(
    "antidistill_proxy_kv_tokens_capacity",
    "Proxy KV-cache capacity in tokens (preallocated).",
    ["profile"],
    multiprocess_mode="livesum",
)


SAMPLED_DELTA = Gauge(
    "antidistill_sampled_delta_sum",
    "Sum over sampled protected tokens of the full-g Δ each was served with, over the profile's Δ scale.",
    ["tier", "profile"],
    multiprocess_mode="sum",
)
SAMPLED_TOKENS = Counter(
    "antidistill_sampled_tokens", "Sampled protected tokens in antidistill_sampled_delta_sum.", ["tier", "profile"]
)


class DoseBuffer:
    """Served Δ values kept on the device and observed every ``DOSE_FLUSH_STEPS`` steps (or when no
    protected row is left): one device→host copy per flush, none in a step."""

    def __init__(self) -> None:
        self.labels: list[tuple[str, str, float]] = []  # (tier, profile, Δ scale) per value
        self.values: list[torch.Tensor] = []
        self.steps = 0

    def add(self, tier: str, profile: str, scale: float, value: torch.Tensor) -> None:
        self.labels.append((tier or "none", profile, scale))
        self.values.append(value)

    def step(self) -> None:
        self.steps += 1
        if self.steps >= DOSE_FLUSH_STEPS:
            self.flush()

    def flush(self) -> None:
        self.steps = 0
        if not self.values:
            return
        for (tier, profile, scale), value in zip(self.labels, torch.stack(self.values).tolist(), strict=True):
            SAMPLED_DELTA.labels(tier, profile).inc(value / scale)
            SAMPLED_TOKENS.labels(tier, profile).inc()
        self.labels, self.values = [], []


class StepClock:
    """Measures engine-step intervals between processor calls (the share-of-step denominator)."""

    def __init__(self) -> None:
        self._last: float | None = None

    def tick(self, protected: bool) -> None:
        now = time.perf_counter()
        if protected and self._last is not None:
            STEP_SECONDS.inc(now - self._last)
        self._last = now if protected else None


def record_profile_step(profile: str, result: StepResult, rows: int, seconds: float) -> None:
    phase = "prefill" if result.prefill_tokens else "decode"
    PROXY_STEP.labels(profile, phase).observe(seconds)
    if result.prefill_tokens:
        PROXY_TOKENS.labels(profile, "prefill").inc(result.prefill_tokens)
    if result.decode_tokens:
        PROXY_TOKENS.labels(profile, "decode").inc(result.decode_tokens)
    PROTECTED_ROWS.labels(profile).observe(rows)


def record_fallback(profile: str, reason: str) -> None:
    FALLBACKS.labels(profile, reason).inc()


def record_kv(profile: str, usage: KVUsage) -> None:
    KV_USED.labels(profile).set(usage.used_tokens)
    KV_CAPACITY.labels(profile).set(usage.capacity_tokens)
