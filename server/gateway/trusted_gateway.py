"""Trusted-gateway mode: an upstream API gateway (LiteLLM, Kong, Envoy) has authenticated the client
with its own key store and names the caller's tier and account in request headers, signed with a
secret only it and this server hold. A verified request is then served exactly as one of our own keys
of that tier (λ policy, caps, limits, audit); everything else is refused (docs/trusted-gateway.md).

The signature is HMAC-SHA256, lowercase hex, over the canonical string (version 2) ::

    v2\\n{tier}\\n{account}\\n{timestamp}\\n{nonce}\\n{method}\\n{path}\\n{body_sha256}

``timestamp`` is the request's Unix time in whole seconds (decimal), ``nonce`` 16–64 characters of
``[A-Za-z0-9_-]``, ``method`` the HTTP method, ``path`` the request path without the query string
(``/v1/chat/completions``) and ``body_sha256`` the lowercase hex SHA-256 of the exact body bytes the
server receives (of ``b""`` for a request without a body). Method and path bind a signature to one
route, the body hash to one request body, and the nonce makes it single-use: the server remembers
each nonce for as long as its timestamp is within ``max_skew`` (server/gateway/nonces.py), so captured headers
cannot be replayed at all, with the same body or another.

The header checks are synchronous (``verify``/``identify``, before the body is read); the body hash and
the nonce are checked by ``await bind(scope, body)`` once the body has been read, before admission.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.nonces import MemoryNonces, NonceStore, NonceStoreFull
from antidistill.server.tiers import Caller, TierTable

VERSION = "v2"
TIER_HEADER = "x-antidistill-tier"
ACCOUNT_HEADER = "x-antidistill-account"
TIMESTAMP_HEADER = "x-antidistill-timestamp"
NONCE_HEADER = "x-antidistill-nonce"
BODY_HEADER = "x-antidistill-body-sha256"
SIGNATURE_HEADER = "x-antidistill-signature"
SIGNED_HEADERS = (TIER_HEADER, ACCOUNT_HEADER, TIMESTAMP_HEADER, NONCE_HEADER, BODY_HEADER, SIGNATURE_HEADER)
SECRET_ENV = "ANTIDISTILL_GATEWAY_SECRET"
MIN_SECRET_CHARS = 32  # `openssl rand -hex 32` gives 64
DEFAULT_MAX_SKEW = 30.0
# every accepted nonce is remembered until its timestamp leaves the window: the bound keeps that memory small
MAX_SKEW_LIMIT = 300.0
# visible ASCII, no spaces: one spelling per name, nothing a header or the canonical string could split on
NAME = re.compile(r"[\x21-\x7e]{1,128}")
TIMESTAMP = re.compile(r"[0-9]{1,12}")
NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
HEX64 = re.compile(r"[0-9a-f]{64}")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class GatewaySecretError(ValueError):
    """A trusted-gateway setting that cannot work; ``antidistill serve`` does not start."""


@dataclass(frozen=True)
class SignedCaller:
    """Who the gateway says the caller is, once the signature checked out."""

    tier: str
    account: str

    @property
    def key_id(self) -> str:
        """A stable, log-safe id for the account, the per-key limits' key: ``gw-`` + 12 hex digits
        (never equal to one of our keys' ids, which are 12 hex digits alone)."""
        return self.digest[:15]

    @property
    def digest(self) -> str:
        """The account's full-length name in the limit state: no two accounts can share a budget."""
        return "gw-" + hashlib.sha256(f"account\n{self.account}".encode()).hexdigest()


def body_sha256(body: bytes) -> str:
    """The body header's value: lowercase hex SHA-256 of the exact bytes sent (``b""`` for no body)."""
    return hashlib.sha256(body).hexdigest()


def canonical(*, tier: str, account: str, timestamp: str, nonce: str, method: str, path: str, body_hash: str) -> bytes:
    """The exact bytes the gateway signs (version 2; the module docstring lists the fields)."""
    return f"{VERSION}\n{tier}\n{account}\n{timestamp}\n{nonce}\n{method.upper()}\n{path}\n{body_hash}".encode()


def sign(
    secret: str, *, tier: str, account: str, timestamp: str, nonce: str, method: str, path: str, body_hash: str
) -> str:
    """The signature header's value (what a gateway computes; tests and tools use it too)."""
    message = canonical(
        tier=tier, account=account, timestamp=timestamp, nonce=nonce, method=method, path=path, body_hash=body_hash
    )
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signed_headers(
    secret: str,
    tier: str,
    account: str,
    method: str,
    path: str,
    body: bytes = b"",
    now: float | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """The six headers a gateway adds to a ``method`` request for ``path`` whose body is exactly
    ``body``, signed at ``now`` (default: the clock) with ``nonce`` (default: a fresh random one)."""
    stamp = str(int(time.time() if now is None else now))
    nonce = secrets.token_urlsafe(16) if nonce is None else nonce
    digest = body_sha256(body)
    fields = {"timestamp": stamp, "nonce": nonce, "method": method, "path": path, "body_hash": digest}
    values = (tier, account, stamp, nonce, digest, sign(secret, tier=tier, account=account, **fields))
    return {name.title(): value for name, value in zip(SIGNED_HEADERS, values, strict=True)}


def resolve_secret(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """The shared secret from ``--trust-gateway [SECRET]`` (None: flag absent; "": read ``SECRET_ENV``),
    or None when the mode is off. A short secret, or one in the environment without the flag, is an error."""
    from_env = environ.get(SECRET_ENV)
    if flag is None:
        if from_env:
            raise GatewaySecretError(
                f"{SECRET_ENV} is set but --trust-gateway is not: pass --trust-gateway to serve trusted-gateway "
                "requests, or unset it"
            )
        return None
    secret = flag or from_env or ""
    if not secret:
        raise GatewaySecretError(f"--trust-gateway needs a secret: --trust-gateway SECRET, or set {SECRET_ENV}")
    if len(secret) < MIN_SECRET_CHARS or secret != secret.strip():
        raise GatewaySecretError(
            f"the trusted-gateway secret must be at least {MIN_SECRET_CHARS} characters without surrounding "
            f"spaces (got {len(secret)}); generate one with `openssl rand -hex 32`"
        )
    return secret


def check_skew(seconds: float) -> float:
    """The allowed clock difference; bounded, so a typo cannot keep signatures acceptable (and their
    nonces in memory) for days."""
    if not 0 < seconds <= MAX_SKEW_LIMIT:
        raise GatewaySecretError(f"--gateway-max-skew {seconds:g}: must be > 0 and ≤ {MAX_SKEW_LIMIT:g} seconds")
    return seconds


def startup_line(max_skew: float, keys: int) -> str:
    """What ``antidistill serve`` prints when the mode is on: who decides the caller, and what is unused."""
    unused = f"; the tiers file's {keys} API keys are not used" if keys else ""
    return (
        "trusted-gateway mode: callers are named by signed X-Antidistill-* headers (single-use, bound to the "
        f"body, ±{max_skew:g} s); "
        f"Authorization is ignored{unused} (docs/trusted-gateway.md)"
    )


@dataclass(frozen=True)
class _Signed:
    """A request's signing headers once their signature and timestamp checked out."""

    caller: SignedCaller
    timestamp: int
    nonce: str
    body_hash: str


class GatewayVerifier:
    """Checks a request's signed identity headers against the shared secret and the clock (``verify``,
    ``identify``), then its body and the nonce's single use (``bind``)."""

    def __init__(
        self,
        secret: str,
        max_skew: float = DEFAULT_MAX_SKEW,
        clock: Callable[[], float] = time.time,
        nonces: NonceStore | None = None,
    ) -> None:
        self._key = secret.encode()
        self.max_skew = check_skew(max_skew)
        self.clock = clock
        self.nonces = nonces if nonces is not None else MemoryNonces()

    def verify(self, scope: MutableMapping[str, Any]) -> SignedCaller:
        """The signed caller of an ASGI request; Refusal 400 for repeated signing headers, 401 for
        missing, malformed, mis-signed, stale or future ones. The body and nonce are ``bind``'s."""
        return self._checked(scope).caller

    def identify(self, scope: MutableMapping[str, Any], tiers: TierTable) -> Caller:
        """The caller of a signed request, as one of our own keys of the signed tier that names the
        signed account would be (the tiers file's ``accounts`` limits apply to it too). A tier
        the tiers file does not define is a 401, not a 403: no caller of ours is established, as for
        a revoked key (the gateway's table and ours disagree; the message says so). An account the
        tiers file restricts to some ``tiers`` gets 403 for any other: the operator's table outranks
        what the gateway signs."""
        signed = self.verify(scope)
        tier = tiers.spec.tiers.get(signed.tier)
        if tier is None:
            raise Refusal(401, f"signed tier {signed.tier!r} is not defined in this server's tiers file")
        account = tiers.account(signed.account)
        if account is not None and account.tiers is not None and signed.tier not in account.tiers:
            allowed = ", ".join(account.tiers) or "none"
            raise Refusal(
                403, f"signed tier {signed.tier!r} is not allowed for account {signed.account!r} (its tiers: {allowed})"
            )
        return Caller(signed.key_id, signed.tier, tier, account=signed.account, digest=signed.digest)

    async def bind(self, scope: MutableMapping[str, Any], body: bytes) -> None:
        """Bind the verified headers to the request as received: ``body`` (every byte the client
        sent) must hash to the signed value, then the nonce is claimed — body first, so that
        headers replayed with another body cannot use up the nonce of the request they were taken
        from. Refusal 401 for another body or a nonce already used, 503 when the nonce cannot
        be remembered (the store is full); the headers are checked again (``verify``), so a request
        is never bound that was not verified."""
        signed = self._checked(scope)
        if not hmac.compare_digest(body_sha256(body), signed.body_hash):
            raise Refusal(
                401,
                f"gateway signature does not cover this body: {BODY_HEADER} is not the SHA-256 of the "
                f"{len(body)} body bytes received (sign the exact bytes sent)",
            )
        ttl = max(signed.timestamp + self.max_skew - self.clock(), 0.0) + 1.0  # until it would be stale
        try:
            fresh = await self.nonces.claim(signed.nonce, ttl)
        except NonceStoreFull as exc:
            raise Refusal(
                503, f"too many signed requests within the replay window ({exc}); retry shortly", retry_after=1
            ) from None
        if not fresh:
            raise Refusal(
                401, f"replayed gateway signature: {NONCE_HEADER} was already used (each signed request is served once)"
            )

    def _checked(self, scope: MutableMapping[str, Any]) -> _Signed:
        values = _signing_headers(scope["headers"])
        missing = [name for name in SIGNED_HEADERS if name not in values]
        if missing:
            raise Refusal(401, f"unsigned request: missing {', '.join(missing)} (trusted-gateway mode)")
        tier, account, stamp, nonce, body_hash, signature = (values[name] for name in SIGNED_HEADERS)
        body_hash, signature = body_hash.lower(), signature.lower()
        for name, value, pattern in (
            (TIER_HEADER, tier, NAME),
            (ACCOUNT_HEADER, account, NAME),
            (TIMESTAMP_HEADER, stamp, TIMESTAMP),
            (NONCE_HEADER, nonce, NONCE),
            (BODY_HEADER, body_hash, HEX64),
        ):
            if not pattern.fullmatch(value):
                raise Refusal(401, f"malformed {name} header")
        message = canonical(
            tier=tier,
            account=account,
            timestamp=stamp,
            nonce=nonce,
            method=scope.get("method", "GET"),
            path=scope["path"],
            body_hash=body_hash,
        )
        expected = hmac.new(self._key, message, hashlib.sha256).hexdigest()
        if not (HEX64.fullmatch(signature) and hmac.compare_digest(expected, signature)):
            raise Refusal(
                401,
                "invalid gateway signature (tier, account, timestamp, nonce, body hash, method and path must match)",
            )
        age = self.clock() - int(stamp)
        if abs(age) > self.max_skew:
            when = "old" if age > 0 else "in the future"
            raise Refusal(
                401, f"stale gateway signature: timestamp {abs(age):.0f} s {when} (allowed ±{self.max_skew:g} s)"
            )
        return _Signed(SignedCaller(tier, account), int(stamp), nonce, body_hash)


def _signing_headers(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Each signing header's one value; a repeated one is a 400 (a proxy may read the first copy,
    we would read another), as for Authorization."""
    seen: dict[str, list[str]] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        if name in SIGNED_HEADERS:
            seen.setdefault(name, []).append(raw_value.decode("latin-1").strip())
    repeated = [f"{len(v)} {k} headers" for k, v in seen.items() if len(v) > 1]
    if repeated:
        raise Refusal(400, f"{', '.join(repeated)}: the gateway must send each signing header once")
    return {k: v[0] for k, v in seen.items()}
