"""The flags of ``antidistill serve`` (those it keeps; every other one goes to vLLM), the proxy flags it
shares with ``antidistill tune`` (``add_proxy_flags``), and the one reading of ``--gradient NAME=PATH``.
``deploy/check_consistency.py`` parses the shipped args with this same parser."""

from __future__ import annotations

import argparse
from typing import get_args

from antidistill.proxy_worker.runtime.settings import ProcessorSettings
from antidistill.server.gateway.config import GatewayConfig
from antidistill.server.gateway.metrics_key import METRICS_KEY_ENV
from antidistill.server.gateway.trusted_gateway import DEFAULT_MAX_SKEW, SECRET_ENV

DEFAULT_PROXY_TOKENS = ProcessorSettings.model_fields["token_budget"].default


def parse_gradient(item: str, bare_name: str | None = None) -> tuple[str, str]:
    """One ``--gradient`` value → (profile name, path). ``NAME=PATH``; with ``bare_name`` a value
    without ``=`` is a PATH for profile ``bare_name`` (``antidistill tune``). ValueError names the item."""
    name, sep, path = item.partition("=")
    if not sep and bare_name is not None:
        return bare_name, item
    if not sep or not name or not path:
        raise ValueError(f"--gradient {item!r}: expected NAME=PATH")
    return name, path


def add_proxy_flags(ap: argparse.ArgumentParser) -> None:
    """The proxy's flags, with the same defaults and help in ``serve`` and ``tune``."""
    ap.add_argument("--proxy", help="proxy model directory (shares the teacher's tokenizer)")
    ap.add_argument(
        "--gradient",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="gradient profile (repeatable); the first is the default profile",
    )
    ap.add_argument(
        "--epsilon", type=float, default=1e-3, help="finite-difference ε (`antidistill calibrate` measures it)"
    )
    ap.add_argument("--proxy-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument(
        "--proxy-token-budget",
        type=int,
        help=f"proxy KV tokens per profile (default {DEFAULT_PROXY_TOKENS}); `serve` caps the teacher's KV to fit "
        "it, or, given --num-gpu-blocks-override alone, sizes the pool from that",
    )


def serve_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="antidistill serve", add_help=False)
    add_proxy_flags(ap)
    ap.add_argument("--tiers", help="tiers YAML (API keys → λ)")
    ap.add_argument(
        "--proxy-attention",
        default=ProcessorSettings.model_fields["proxy_attention"].default,
        choices=get_args(ProcessorSettings.model_fields["proxy_attention"].annotation),
        help="proxy attention: 'reference' gathers the paged KV per layer, 'flex' reads it in place "
        "(compiled FlexAttention; compiles once per shape bucket) (default: %(default)s)",
    )
    ap.add_argument("--max-lambda", type=float, default=50.0, help="largest λ the engine accepts")
    ap.add_argument(
        "--audit-log",
        default=GatewayConfig.audit_log,
        metavar="PATH",
        help="append one JSON line per request to this file; '-' is stderr (default: %(default)s)",
    )
    ap.add_argument("--audit-text", action="store_true", help="include prompt text in audit lines")
    ap.add_argument(
        "--shared-prefix-cache",
        action="store_true",
        help="let tenants share the teacher's and the proxy's prefix caches (default: a keyed cache_salt per "
        "account, so no tenant can probe another's prompts through cache hits)",
    )
    ap.add_argument(
        "--max-body-bytes",
        type=int,
        help="largest generation request body in bytes, larger ones get 413 (default: 64 × max-model-len + 1 MiB)",
    )
    ap.add_argument(
        "--trust-gateway",
        nargs="?",
        const="",
        metavar="SECRET",
        help="trusted-gateway mode: an upstream gateway names tier and account in HMAC-signed headers "
        f"(docs/trusted-gateway.md); without SECRET it is read from {SECRET_ENV}",
    )
    ap.add_argument(
        "--gateway-max-skew",
        type=float,
        default=DEFAULT_MAX_SKEW,
        metavar="SECONDS",
        help=f"trusted-gateway signatures older or newer than this are refused (default {DEFAULT_MAX_SKEW:g})",
    )
    ap.add_argument(
        "--state",
        metavar="URL",
        help="share rate limits, in-flight leases and escalation with every replica through Redis "
        "(redis://host:port/db); without it each API-server process counts alone (deploy/README.md: Scaling)",
    )
    ap.add_argument(
        "--state-lease-seconds",
        type=float,
        default=GatewayConfig.state_lease_seconds,
        metavar="SECONDS",
        help="with --state: a dead replica's in-flight slots are freed after this (default 30; renewed while running)",
    )
    ap.add_argument(
        "--state-timeout",
        type=float,
        default=GatewayConfig.state_timeout,
        metavar="SECONDS",
        help="with --state: bound on each Redis operation; slower answers fall back to this process's own "
        f"limits for a second (default {GatewayConfig.state_timeout:g})",
    )
    ap.add_argument(
        "--metrics-key-file",
        metavar="PATH",
        help="/metrics answers only Authorization: Bearer <the key in this file> (or set "
        f"{METRICS_KEY_ENV}); without a metrics key /metrics answers 403: its counters follow every tenant's "
        "traffic (docs/metrics.md)",
    )
    ap.add_argument(
        "--embedded-default",
        action="store_true",
        help="prepare and serve the embedded SmolLM2 default (teacher, proxy, gradient, demo tiers)",
    )
    return ap
