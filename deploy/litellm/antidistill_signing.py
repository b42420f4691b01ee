"""LiteLLM proxy callback for antidistill's trusted-gateway mode (docs/trusted-gateway.md).

LiteLLM authenticates the client with its own keys; this module names the caller to antidistill in
six headers signed with the secret both sides hold (``ANTIDISTILL_GATEWAY_SECRET``)::

    X-Antidistill-Tier, X-Antidistill-Account, X-Antidistill-Timestamp (Unix seconds),
    X-Antidistill-Nonce (random, single use), X-Antidistill-Body-Sha256 (hex SHA-256 of the body),
    X-Antidistill-Signature = hex HMAC-SHA256(secret,
        "v2\\n{tier}\\n{account}\\n{timestamp}\\n{nonce}\\n{method}\\n{path}\\n{body_sha256}")

It works in two steps, because no single LiteLLM hook sees both who the caller is and the bytes sent:

1. ``async_pre_call_hook`` (a LiteLLM callback) decides the tier and the account from the caller's
   LiteLLM identity, and attaches them to the upstream request as an internal *grant* header,
   authenticated with a key this process draws at start-up (so no client can forge one). The hook
   cannot sign here: after it, LiteLLM still rewrites the request (the model alias becomes the
   upstream model, provider parameters are mapped or dropped, proxy-only fields removed) and the
   OpenAI SDK merges ``extra_body`` and serialises the JSON itself, so the bytes sent are unknown.
2. ``sign_request`` runs as an httpx request event hook on ``litellm.aclient_session``, the HTTP
   client LiteLLM's OpenAI-compatible provider hands to the OpenAI SDK (LiteLLM 1.108:
   ``BaseOpenAILLM._get_async_http_client``). It sees the final request: the exact body bytes,
   method and path. It strips every ``X-Antidistill-*`` header and, when a valid grant is present
   and the URL is under ``ANTIDISTILL_API_BASE``, adds the six signed headers. A request that did not
   pass through both steps reaches antidistill unsigned and is refused (401): nothing fails open.

Tier (docs/trusted-gateway.md, "Which tier"): from admin-controlled sources only — the operator's map
``ANTIDISTILL_TIER_MAP`` (a JSON object, or the path of a JSON or YAML file, of account → tier), else the
team's metadata ``antidistill_tier``, else ``ANTIDISTILL_DEFAULT_TIER``, else LiteLLM refuses (403). A
key's own metadata is never read: LiteLLM lets key owners write it.

Account: ``team:<team_id>``, else ``user:<user_id>``, else ``key:<hash>`` — namespaced, so that no
gateway account shares the limits of one of antidistill's configured ``accounts`` by accident.

It runs inside LiteLLM's image, so it needs only the standard library, httpx, FastAPI, LiteLLM (written
against LiteLLM 1.108) and, for a YAML tier map, PyYAML. A missing or short secret, a missing
``ANTIDISTILL_API_BASE`` or an invalid tier map stops LiteLLM at start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import litellm
from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger

log = logging.getLogger("antidistill_signing")
ROUTES = {"completion", "acompletion", "text_completion", "atext_completion"}  # what antidistill serves
PREFIX = "x-antidistill-"
GRANT_HEADER = "x-antidistill-grant"  # step 1 → step 2, inside this process; never sent upstream
GRANT_SECONDS = 900  # LiteLLM's queueing, the SDK's retries and the 600 s request timeout fit in it
NAME = re.compile(r"[\x21-\x7e]{1,128}")  # what antidistill accepts for a tier or an account
NAMESPACES = ("team:", "user:", "key:")
TIER_FIELD = "antidistill_tier"


def signature(secret: str, tier: str, account: str, stamp: str, nonce: str, method: str, path: str, digest: str) -> str:
    """The v2 signature antidistill verifies (server/gateway/trusted_gateway.py)."""
    message = f"v2\n{tier}\n{account}\n{stamp}\n{nonce}\n{method.upper()}\n{path}\n{digest}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def namespaced(kind: str, raw: str) -> str:
    """``kind:raw``, or ``kind:sha256-…`` where antidistill could not read ``raw`` (spaces, length)."""
    name = f"{kind}:{raw}"
    return name if NAME.fullmatch(name) else f"{kind}:sha256-{hashlib.sha256(raw.encode()).hexdigest()[:32]}"


def account_of(user: Any) -> str | None:
    """The key's team, else its user, else the key itself (LiteLLM's ``token`` is already a hash of
    the key; it is hashed again so that no form of the key is sent upstream). None: no identity."""
    if team := getattr(user, "team_id", None):
        return namespaced("team", str(team))
    if person := getattr(user, "user_id", None):
        return namespaced("user", str(person))
    if token := getattr(user, "token", None):
        return "key:" + hashlib.sha256(str(token).encode()).hexdigest()[:32]
    return None


def load_tier_map(value: str | None) -> dict[str, str]:
    """``ANTIDISTILL_TIER_MAP``: a JSON object inline (it starts with ``{``), or the path of a JSON
    (``.json``) or YAML file holding one; account names must be namespaced (``team:acme``), tiers valid
    names. Errors stop LiteLLM at start-up rather than leave the map silently unused."""
    if not value or not value.strip():
        return {}
    text = value.strip()
    where = "ANTIDISTILL_TIER_MAP" if text.startswith(("{", "[")) else f"ANTIDISTILL_TIER_MAP file {text}"
    try:
        raw = _parse_tier_map(text)
    except Exception as exc:  # OSError, json.JSONDecodeError, yaml.YAMLError: one line, then no start
        raise ValueError(f"antidistill_signing: {where}: {' '.join(str(exc).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"antidistill_signing: {where} must be an object of account → tier")
    for account, tier in raw.items():
        if not (isinstance(account, str) and account.startswith(NAMESPACES) and NAME.fullmatch(account)):
            raise ValueError(
                f"antidistill_signing: {where}: account {account!r} must be team:<id>, user:<id> or key:<hash>"
            )
        if not (isinstance(tier, str) and NAME.fullmatch(tier)):
            raise ValueError(f"antidistill_signing: {where}: tier {tier!r} for {account} is not a tier name")
    return dict(raw)


def _parse_tier_map(text: str) -> Any:
    if text.startswith(("{", "[")):  # inline JSON
        return json.loads(text)
    content = Path(text).read_text()
    if text.endswith(".json"):
        return json.loads(content)
    import yaml  # LiteLLM's proxy depends on PyYAML (its config.yaml)

    return yaml.safe_load(content)


class AntidistillSigner(CustomLogger):
    """Both steps (module docstring); ``install`` puts step 2 on LiteLLM's HTTP client."""

    def __init__(
        self,
        secret: str | None = None,
        api_base: str | None = None,
        default_tier: str | None = None,
        tier_map: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.secret = secret if secret is not None else os.environ.get("ANTIDISTILL_GATEWAY_SECRET", "")
        if len(self.secret) < 32:
            raise ValueError("antidistill_signing: ANTIDISTILL_GATEWAY_SECRET must hold the shared secret (≥ 32 chars)")
        base = api_base if api_base is not None else os.environ.get("ANTIDISTILL_API_BASE", "")
        if not base:
            raise ValueError("antidistill_signing: ANTIDISTILL_API_BASE must name antidistill (http://host:8000/v1)")
        self.api_base = httpx.URL(base)
        self.default_tier = default_tier if default_tier is not None else os.environ.get("ANTIDISTILL_DEFAULT_TIER")
        self.tier_map = tier_map if tier_map is not None else load_tier_map(os.environ.get("ANTIDISTILL_TIER_MAP"))
        self._grant_key = secrets.token_bytes(32)

    def tier_of(self, user: Any, account: str) -> str | None:
        """The operator's map, else the team's metadata, else the default; never the key's metadata."""
        if account in self.tier_map:
            return self.tier_map[account]
        team = getattr(user, "team_metadata", None)
        if isinstance(team, dict) and team.get(TIER_FIELD):
            return str(team[TIER_FIELD])
        return self.default_tier or None

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict, call_type: str) -> dict:
        """Step 1: the grant for this call, or 403; a client's own ``X-Antidistill-*`` headers are dropped."""
        kept = {k: v for k, v in (data.get("extra_headers") or {}).items() if not k.lower().startswith(PREFIX)}
        if call_type not in ROUTES:
            if data.get("extra_headers"):
                data["extra_headers"] = kept
            return data
        account = account_of(user_api_key_dict)
        if account is None:
            raise HTTPException(403, "antidistill: this key has no team, user or token to name its account")
        tier = self.tier_of(user_api_key_dict, account)
        if not tier or not NAME.fullmatch(tier):
            raise HTTPException(
                403,
                "this key has no antidistill tier (the operator's ANTIDISTILL_TIER_MAP, or the team's metadata "
                f"{TIER_FIELD}; a key's own metadata is not read)",
            )
        data["extra_headers"] = {**kept, GRANT_HEADER: self.grant(tier, account)}
        return data

    def grant(self, tier: str, account: str, now: float | None = None) -> str:
        expires = str(int((time.time() if now is None else now) + GRANT_SECONDS))
        return f"{tier} {account} {expires} {self._grant_mac(tier, account, expires)}"

    def granted(self, value: str, now: float | None = None) -> tuple[str, str] | None:
        """(tier, account) of a grant this process issued and that has not expired; None otherwise."""
        parts = value.split(" ")
        if len(parts) != 4 or not parts[2].isdigit():
            return None
        tier, account, expires, mac = parts
        if not hmac.compare_digest(mac, self._grant_mac(tier, account, expires)):
            return None
        return (tier, account) if int(expires) >= (time.time() if now is None else now) else None

    def _grant_mac(self, tier: str, account: str, expires: str) -> str:
        return hmac.new(self._grant_key, f"{tier}\n{account}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def for_antidistill(self, url: httpx.URL) -> bool:
        """Whether ``url`` is under ``ANTIDISTILL_API_BASE`` (scheme, host, port and path prefix):
        signed headers never go to another upstream this LiteLLM also serves."""
        base = self.api_base
        prefix = base.path.rstrip("/")
        return (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port) and (
            url.path == prefix or url.path.startswith(prefix + "/")
        )

    def headers(self, tier: str, account: str, method: str, path: str, body: bytes, now: float | None = None) -> dict:
        stamp = str(int(time.time() if now is None else now))
        nonce = secrets.token_urlsafe(16)
        digest = hashlib.sha256(body).hexdigest()
        return {
            "X-Antidistill-Tier": tier,
            "X-Antidistill-Account": account,
            "X-Antidistill-Timestamp": stamp,
            "X-Antidistill-Nonce": nonce,
            "X-Antidistill-Body-Sha256": digest,
            "X-Antidistill-Signature": signature(self.secret, tier, account, stamp, nonce, method, path, digest),
        }

    async def sign_request(self, request: httpx.Request) -> None:
        """Step 2 (an httpx request hook; it runs for every send, retries included, each with a fresh
        nonce and timestamp): strip ``X-Antidistill-*``, then sign the exact request if it carries a
        valid grant and goes to antidistill."""
        grants = request.headers.get_list(GRANT_HEADER)
        for name in {k for k in request.headers if k.lower().startswith(PREFIX)}:
            del request.headers[name]
        if not grants:
            return
        who = self.granted(grants[0]) if len(grants) == 1 else None
        if who is None or not self.for_antidistill(request.url):
            if who is None:
                log.warning("antidistill_signing: a request to %s had an invalid grant; sent unsigned", request.url)
            return
        try:
            body = request.content
        except httpx.RequestNotRead:
            log.warning("antidistill_signing: a streamed request body cannot be signed; sent unsigned (401)")
            return
        request.headers.update(self.headers(*who, request.method, request.url.path, body))

    def install(self) -> httpx.AsyncClient:
        """Put ``sign_request`` on ``litellm.aclient_session`` (created when the operator set none,
        with no redirects: a redirect would re-send signed headers elsewhere) and return it."""
        client = getattr(litellm, "aclient_session", None)
        if client is None:
            client = httpx.AsyncClient(
                follow_redirects=False, limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100)
            )
            litellm.aclient_session = client
        hooks = client.event_hooks
        hooks["request"] = [*hooks.get("request", []), self.sign_request]
        client.event_hooks = hooks
        return client


proxy_handler_instance = AntidistillSigner()
proxy_handler_instance.install()
