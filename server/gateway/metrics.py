"""Server-side Prometheus metrics (API-server process): who asked, at which λ, what came back.

Exported on vLLM's own ``/metrics`` (the same registry vLLM collects; multiprocess mode when
``PROMETHEUS_MULTIPROC_DIR`` is set, as ``antidistill serve`` does), which answers only the holder
of the metrics key (``serve_metrics``; why: server/gateway/metrics_key.py). Every name starts with
``antidistill_``.
"""

from __future__ import annotations

from collections.abc import Callable

from antidistill.server.gateway.errors import error_body, respond
from antidistill.server.gateway.metrics_key import metrics_refusal
from prometheus_client import Counter, Gauge, Histogram
from starlette.types import Receive, Scope, Send

LAMBDA_BUCKETS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)

REQUESTS = Counter("antidistill_requests", "Requests by tier, HTTP status and client API.", ["tier", "status", "api"])
REJECTIONS = Counter("antidistill_rejections", "Requests refused by the gateway (401, 403, 429).", ["code"])
EFFECTIVE_LAMBDA = Histogram(
    "antidistill_effective_lambda", "λ applied to admitted requests.", ["tier"], buckets=LAMBDA_BUCKETS
)
OUTPUT_TOKENS = Counter(
    "antidistill_output_tokens", "Completion tokens served, split by whether λ > 0.", ["tier", "protected"]
)
ESCALATED = Counter("antidistill_escalated_requests", "Requests served at an escalated λ.", ["tier"])
PROTECTION_FAILURES = Counter(
    "antidistill_protection_failures",
    "Protected requests whose Δ was unavailable for some step, by what was done (refused or degraded).",
    ["tier", "reason", "action"],
)
UNPROTECTED_TOKENS = Counter(
    "antidistill_unprotected_tokens",
    "Tokens emitted with Δ = 0 on protected requests (degrade tiers only; refused requests emit none).",
    ["tier"],
)
STATE_FALLBACKS = Counter(
    "antidistill_state_fallbacks",
    "Requests admitted by this process's own limits because the shared state (--state) did not answer.",
    ["reason"],
)
STATE_MODE = Gauge(
    "antidistill_state_mode",
    "API-server processes whose limits are in memory, shared (redis), or on local fallback (local).",
    ["mode"],
    multiprocess_mode="livesum",
)
STATE_MODES = ("memory", "redis", "local")
METRICS_REFUSALS = Counter(
    "antidistill_metrics_refusals",
    "Requests for /metrics refused: 401 without the metrics key or with another key (API keys included), "
    "403 while no metrics key is configured, 400 for more than one credential.",
    ["code"],
)


async def serve_metrics(app: Callable, scope: Scope, receive: Receive, send: Send, key: str | None) -> None:
    """``/metrics`` from ``app`` for the bearer of the metrics ``key``; anyone else gets the refusal
    (401 with ``WWW-Authenticate: Bearer``, 403 while no key is configured) and it is counted here.
    No audit line: a scraper without its key would write one every scrape interval."""
    refusal = metrics_refusal(scope, key)
    if refusal is None:
        return await app(scope, receive, send)
    METRICS_REFUSALS.labels(str(refusal.status)).inc()
    extra = [(b"www-authenticate", b"Bearer")] * (refusal.status == 401)
    await respond(send, refusal.status, error_body(refusal.status, refusal.message), extra)


def set_state_mode(mode: str) -> None:
    """This process's limit state is now ``mode`` (one of ``STATE_MODES``)."""
    for name in STATE_MODES:
        STATE_MODE.labels(name).set(1 if name == mode else 0)


def record_protection_failure(tier: str, reason: str, refused: bool, unprotected_tokens: int) -> None:
    """A protected request that lost Δ for some step: refused, or served with ``unprotected_tokens``."""
    PROTECTION_FAILURES.labels(tier, reason, "refused" if refused else "degraded").inc()
    if unprotected_tokens:
        UNPROTECTED_TOKENS.labels(tier).inc(unprotected_tokens)


def record_request(
    tier: str, status: int, lam: float | None, completion_tokens: int, escalated: bool, api: str
) -> None:
    """One finished (or refused) request; ``api``: its route's client API (server/gateway/apis/), or "other"."""
    REQUESTS.labels(tier, str(status), api).inc()
    if status in (401, 403, 429):
        REJECTIONS.labels(str(status)).inc()
    if lam is None or status >= 400:
        return
    EFFECTIVE_LAMBDA.labels(tier).observe(lam)
    OUTPUT_TOKENS.labels(tier, "true" if lam > 0 else "false").inc(completion_tokens)
    if escalated:
        ESCALATED.labels(tier).inc()
