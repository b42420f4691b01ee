"""What the end-to-end tests share: a real `antidistill serve` on the tiny models, the request
bodies they send it, and reading its /metrics (with the server's metrics key: no API key opens it).
Test modules import from here, never from each other."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from antidistill.benchmarks.launch import free_port, server_process
from antidistill.benchmarks.tiny.serving import ADModels, antidistill_serve_args, build_models, write_tiers
from antidistill.server.gateway.metrics_key import write_metrics_key
from prometheus_client.parser import text_string_to_metric_families

F = TypeVar("F", bound=Callable[..., Any])
Samples = dict[tuple[str, frozenset], float]


def engine_fixture(*, scope: str = "module", slow: bool = False) -> Callable[[F], F]:
    """``pytest.fixture`` for a fixture that starts a real vLLM engine or server. conftest marks every
    test that uses one (directly or through another fixture) ``engine``, and ``slow`` too if the
    fixture itself takes minutes; tests that use none are ``unit``."""

    def decorate(fn: F) -> F:
        fn.starts_engine = True  # type: ignore[attr-defined]
        fn.slow = slow  # type: ignore[attr-defined]
        return pytest.fixture(scope=scope)(fn)

    return decorate


@dataclass(frozen=True)
class Server:
    """A running `antidistill serve`: where it listens, one API key per tier, its metrics key, and its files."""

    base: str  # http://127.0.0.1:<port>
    port: int
    keys: Mapping[str, str]  # tier → API key
    models: ADModels
    tiers: Path  # the tiers file (SIGHUP re-reads it)
    audit: Path
    log: Path  # the server's stdout and stderr
    process: subprocess.Popen
    metrics_key: str  # Authorization: Bearer <it> reads /metrics (metrics_key_args)

    @property
    def model(self) -> str:
        """The served model's name (vLLM names it by its path)."""
        return str(self.models.teacher)

    def auth(self, tier: str | None) -> dict[str, str]:
        """The Authorization header of that tier's key; no header for ``None``."""
        return {"Authorization": f"Bearer {self.keys[tier]}"} if tier else {}


def metrics_key_args(root: Path) -> tuple[str, list[str]]:
    """A fresh metrics key in ``root``/metrics.key and the `antidistill serve` flags that name it."""
    path = root / "metrics.key"
    return write_metrics_key(path), ["--metrics-key-file", str(path)]


@contextmanager
def tiny_server(
    root: Path,
    tiers: Mapping[str, Mapping[str, Any]],
    *,
    profiles: Sequence[str] = ("math",),
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    write: Callable[[Path, Mapping[str, Any]], dict[str, str]] = write_tiers,
) -> Iterator[Server]:
    """Build the tiny models under ``root``, write the tiers file with ``write`` (one fresh key per
    tier by default), start `antidistill serve` with a metrics key and ``extra_args``, stop it on exit."""
    models = build_models(root)
    tiers_file = root / "tiers.yaml"
    keys = write(tiers_file, tiers)
    audit, log = root / "audit.jsonl", root / "server.log"
    port = free_port()
    metrics_key, metrics_args = metrics_key_args(root)
    args = [*antidistill_serve_args(models, tiers_file, audit, port, tuple(profiles)), *metrics_args, *extra_args]
    with server_process(args, {"VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}, log, port) as (base, process):
        yield Server(base, port, keys, models, tiers_file, audit, log, process, metrics_key)


def completion(srv: Server, **fields: Any) -> dict[str, Any]:
    """A short greedy completions body; ``fields`` override or add to it."""
    return {"model": srv.model, "prompt": "The sum of 12", "max_tokens": 4, "temperature": 0, **fields}


def chat(srv: Server, **fields: Any) -> dict[str, Any]:
    """A short greedy chat body; ``fields`` override or add to it."""
    messages = [{"role": "user", "content": "Alice has 3 apples"}]
    return {"model": srv.model, "messages": messages, "max_tokens": 4, "temperature": 0, **fields}


def audit_lines(srv: Server) -> list[dict[str, Any]]:
    """The server's audit lines so far (none before its first request)."""
    text = srv.audit.read_text() if srv.audit.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def audit_until(srv: Server, done: Callable[[list[dict[str, Any]]], bool], seconds: float = 10) -> list[dict[str, Any]]:
    """The audit lines once ``done`` holds for them (or at the deadline): a request's line is written
    after its response has been sent, so a client can read the file before its own line is there."""
    deadline = time.monotonic() + seconds
    while not done(lines := audit_lines(srv)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines


def metrics_text(base: str, key: str) -> str:
    """``base``/metrics read with the metrics ``key`` (a refusal fails here, not as missing samples)."""
    res = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    res.raise_for_status()
    return res.text


def scrape(base: str, key: str) -> Samples:
    """Every sample on ``base``/metrics (read with the metrics ``key``), keyed by (name, labels)."""
    samples = {}
    for family in text_string_to_metric_families(metrics_text(base, key)):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)
