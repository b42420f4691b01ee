"""LiteLLM proxy callback for antidistill's trusted-gateway mode (docs/trusted-gateway.md).

LiteLLM authenticates the client with its own keys; this hook names the caller to antidistill in
four headers, signed with the secret both sides hold (``ANTIDISTILL_GATEWAY_SECRET``):

    X-Antidistill-Tier, X-Antidistill-Account, X-Antidistill-Timestamp (Unix seconds),
    X-Antidistill-Signature = hex HMAC-SHA256(secret, "v1\\n{tier}\\n{account}\\n{timestamp}\\n{path}")

``path`` is the upstream request's path: ``ANTIDISTILL_PATH_PREFIX`` (default ``/v1``, the path of the
``api_base`` in config.yaml) + ``/chat/completions`` or ``/completions``. Other call types are not
signed (antidistill serves only those two routes, and answers 401 to anything unsigned).

Tier: the LiteLLM key's metadata ``antidistill_tier``, else its team's metadata, else
``ANTIDISTILL_DEFAULT_TIER``; with none the request is refused here (403). Account: the key's team,
else its user, else its hashed token — antidistill's per-account limits and escalation follow it.

It runs inside LiteLLM's image, so it needs only the standard library, FastAPI and LiteLLM (written
against LiteLLM 1.108). A missing or short secret stops LiteLLM at start-up: nothing is forwarded unsigned.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from typing import Any

from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger

ROUTES = {
    "completion": "/chat/completions",
    "acompletion": "/chat/completions",
    "text_completion": "/completions",
    "atext_completion": "/completions",
}
PREFIX = "x-antidistill-"
NAME = re.compile(r"[\x21-\x7e]{1,128}")  # what antidistill accepts for a tier or an account


def signature(secret: str, tier: str, account: str, timestamp: str, path: str) -> str:
    message = f"v1\n{tier}\n{account}\n{timestamp}\n{path}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _account(user: Any) -> str:
    """The team, else the user, else the key (hashed); hashed again if antidistill could not read it."""
    raw = getattr(user, "team_id", None) or getattr(user, "user_id", None)
    if not raw:
        raw = "key-" + (getattr(user, "token", None) or "unknown")[:16]
    return raw if NAME.fullmatch(raw) else "sha256-" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def _tier(user: Any, default: str | None) -> str | None:
    for metadata in (getattr(user, "metadata", None), getattr(user, "team_metadata", None)):
        if isinstance(metadata, dict) and metadata.get("antidistill_tier"):
            return str(metadata["antidistill_tier"])
    return default


class AntidistillSigner(CustomLogger):
    def __init__(self, secret: str | None = None, prefix: str | None = None, default_tier: str | None = None) -> None:
        super().__init__()
        self.secret = secret if secret is not None else os.environ.get("ANTIDISTILL_GATEWAY_SECRET", "")
        if len(self.secret) < 32:
            raise ValueError("antidistill_signing: ANTIDISTILL_GATEWAY_SECRET must hold the shared secret (≥ 32 chars)")
        self.prefix = (prefix if prefix is not None else os.environ.get("ANTIDISTILL_PATH_PREFIX", "/v1")).rstrip("/")
        self.default_tier = default_tier if default_tier is not None else os.environ.get("ANTIDISTILL_DEFAULT_TIER")

    def headers(self, tier: str, account: str, path: str, now: float | None = None) -> dict[str, str]:
        stamp = str(int(time.time() if now is None else now))
        return {
            "X-Antidistill-Tier": tier,
            "X-Antidistill-Account": account,
            "X-Antidistill-Timestamp": stamp,
            "X-Antidistill-Signature": signature(self.secret, tier, account, stamp, path),
        }

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: str) -> dict:
        route = ROUTES.get(call_type)
        if route is None:
            return data
        tier = _tier(user_api_key_dict, self.default_tier)
        if not tier or not NAME.fullmatch(tier):
            raise HTTPException(403, "this key has no antidistill tier (key or team metadata antidistill_tier)")
        # a client's own copies (extra_headers in the body) would reach antidistill twice: it answers 400
        kept = {k: v for k, v in (data.get("extra_headers") or {}).items() if not k.lower().startswith(PREFIX)}
        data["extra_headers"] = {**kept, **self.headers(tier, _account(user_api_key_dict), self.prefix + route)}
        return data


proxy_handler_instance = AntidistillSigner()
