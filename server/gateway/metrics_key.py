"""Who may read ``/metrics``: the holder of the operator's metrics key, and nobody else.

/metrics counts every tenant's traffic: ``antidistill_proxy_tokens_total{phase="prefill"}`` and vLLM's
``vllm:prefix_cache_hits`` move by how much of each prompt was already cached, so a client reading
them after sending a guessed prefix would learn whether another tenant's prompts start that way.
The route therefore needs its own bearer key, which the operator gives to the scraper alone
(``antidistill serve --metrics-key-file PATH``, or ``ANTIDISTILL_METRICS_KEY``). No tier's API key
opens it, and without a metrics key it stays shut, with a 403 that says how to open it (fail closed).

This module holds the key's rules and where the key comes from. It imports no Prometheus code, so
``antidistill serve`` can read the key before it sets up the metrics directory; the gate on requests
is ``serve_metrics`` in server/gateway/metrics.py.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from antidistill.server.gateway.credentials import bearer
from antidistill.server.gateway.errors import Refusal

METRICS_PATH = "/metrics"
METRICS_KEY_ENV = "ANTIDISTILL_METRICS_KEY"
MIN_KEY_CHARS = 32  # `openssl rand -hex 32` gives 64
KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: one spelling in a header, nothing a proxy trims
DISABLED = (
    "/metrics is disabled: no metrics key is configured. Start the server with --metrics-key-file PATH "
    f"(or {METRICS_KEY_ENV}) and scrape with Authorization: Bearer <metrics key> (docs/metrics.md)"
)


class MetricsKeyError(ValueError):
    """A metrics key that cannot be used; ``antidistill serve`` does not start."""


def check_metrics_key(key: str, source: str = METRICS_KEY_ENV) -> str:
    """``key`` if it is long enough to be unguessable and travels unchanged in a header."""
    if len(key) < MIN_KEY_CHARS or not KEY_CHARS.fullmatch(key):
        raise MetricsKeyError(
            f"{source}: the metrics key must be at least {MIN_KEY_CHARS} visible ASCII characters without spaces "
            f"(got {len(key)} characters); generate one with `openssl rand -hex 32`"
        )
    return key


def read_metrics_key(path: str | Path) -> str:
    """The key in ``path``; surrounding whitespace (a trailing newline) is dropped, as Prometheus's
    ``credentials_file`` drops it, so one file can serve both sides."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise MetricsKeyError(f"--metrics-key-file {path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise MetricsKeyError(f"--metrics-key-file {path}: not text") from None
    return check_metrics_key(text.strip(), f"--metrics-key-file {path}")


def resolve_metrics_key(path: str | None, environ: Mapping[str, str]) -> str | None:
    """The metrics key from ``--metrics-key-file`` or ``METRICS_KEY_ENV`` (None: neither, /metrics
    stays shut); both at once is an error, so the operator knows which one is in force."""
    from_env = environ.get(METRICS_KEY_ENV)
    if path is not None and from_env:
        raise MetricsKeyError(f"both --metrics-key-file and {METRICS_KEY_ENV} are set: give the metrics key once")
    if path is not None:
        return read_metrics_key(path)
    return check_metrics_key(from_env) if from_env else None


def new_metrics_key() -> str:
    """A fresh metrics key; its prefix tells it apart from API keys (``ad-``) in a leak report."""
    return "ad-metrics-" + secrets.token_urlsafe(32)


def write_metrics_key(path: str | Path) -> str:
    """A fresh key written to a new file ``path`` readable by its owner only (0600); returns the key."""
    key = new_metrics_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def metrics_refusal(scope: MutableMapping[str, Any], key: str | None) -> Refusal | None:
    """None if the request carries the metrics key ``key``; else why not: 403 when no key is
    configured, 401 without the key or with another (an API key included), 400 for more than one
    credential (``credentials.bearer``). Compared as SHA-256 digests in constant time: neither the
    key's bytes nor its length show in the timing."""
    if key is None:
        return Refusal(403, DISABLED)
    try:
        presented = bearer(scope)
    except Refusal as err:
        return err
    if presented is None:
        return Refusal(401, "/metrics needs Authorization: Bearer <metrics key>")
    if not hmac.compare_digest(_digest(presented), _digest(key)):
        return Refusal(401, "invalid metrics key (API keys do not open /metrics)")
    return None


def startup_line(key: str | None) -> str | None:
    """What ``antidistill serve`` prints when /metrics stays shut (None: it is open to the key)."""
    if key is not None:
        return None
    return (
        f"no metrics key: /metrics answers 403 (it counts every tenant's traffic); pass --metrics-key-file PATH "
        f"or set {METRICS_KEY_ENV}, and give the key to your Prometheus (docs/metrics.md)"
    )


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
