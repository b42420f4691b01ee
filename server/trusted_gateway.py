"""Trusted-gateway mode: an upstream API gateway (LiteLLM, Kong, Envoy) has authenticated the client
with its own key store and names the caller's tier and account in four request headers, signed with
a secret only it and this server hold. A verified request is then served exactly as one of our own
keys of that tier (λ policy, caps, limits, audit); everything else is refused (docs/trusted-gateway.md).

The signature is HMAC-SHA256, lowercase hex, over the canonical string ::

    v1\\n{tier}\\n{account}\\n{timestamp}\\n{path}

where ``timestamp`` is the request's Unix time in whole seconds (decimal) and ``path`` the request
path without the query string (``/v1/chat/completions``). The path binds a signature to one route;
the timestamp bounds how long captured headers can be replayed (``max_skew`` either way).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from antidistill.server.policy import PolicyError
from antidistill.server.tiers import Caller, TierTable

VERSION = "v1"
TIER_HEADER = "x-antidistill-tier"
ACCOUNT_HEADER = "x-antidistill-account"
TIMESTAMP_HEADER = "x-antidistill-timestamp"
SIGNATURE_HEADER = "x-antidistill-signature"
SIGNED_HEADERS = (TIER_HEADER, ACCOUNT_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
SECRET_ENV = "ANTIDISTILL_GATEWAY_SECRET"
MIN_SECRET_CHARS = 32  # `openssl rand -hex 32` gives 64
DEFAULT_MAX_SKEW = 300.0
MAX_SKEW_LIMIT = 3600.0
# visible ASCII, no spaces: one spelling per name, nothing a header or the canonical string could split on
NAME = re.compile(r"[\x21-\x7e]{1,128}")
TIMESTAMP = re.compile(r"[0-9]{1,12}")
SIGNATURE = re.compile(r"[0-9a-f]{64}")


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
        return "gw-" + hashlib.sha256(f"account\n{self.account}".encode()).hexdigest()[:12]


def canonical(tier: str, account: str, timestamp: str, path: str) -> bytes:
    """The exact bytes the gateway signs."""
    return f"{VERSION}\n{tier}\n{account}\n{timestamp}\n{path}".encode()


def sign(secret: str, tier: str, account: str, timestamp: str, path: str) -> str:
    """The signature header's value (what a gateway computes; tests and tools use it too)."""
    return hmac.new(secret.encode(), canonical(tier, account, timestamp, path), hashlib.sha256).hexdigest()


def signed_headers(secret: str, tier: str, account: str, path: str, now: float | None = None) -> dict[str, str]:
    """The four headers a gateway adds to a request for ``path``, signed at ``now`` (default: the clock)."""
    stamp = str(int(time.time() if now is None else now))
    return {
        "X-Antidistill-Tier": tier,
        "X-Antidistill-Account": account,
        "X-Antidistill-Timestamp": stamp,
        "X-Antidistill-Signature": sign(secret, tier, account, stamp, path),
    }


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
    """The allowed clock difference; bounded, so a typo cannot make signatures replayable for days."""
    if not 0 < seconds <= MAX_SKEW_LIMIT:
        raise GatewaySecretError(f"--gateway-max-skew {seconds:g}: must be > 0 and ≤ {MAX_SKEW_LIMIT:g} seconds")
    return seconds


def startup_line(max_skew: float, keys: int) -> str:
    """What ``antidistill serve`` prints when the mode is on: who decides the caller, and what is unused."""
    unused = f"; the tiers file's {keys} API keys are not used" if keys else ""
    return (
        f"trusted-gateway mode: callers are named by signed X-Antidistill-* headers (±{max_skew:g} s); "
        f"Authorization is ignored{unused} (docs/trusted-gateway.md)"
    )


class GatewayVerifier:
    """Checks a request's signed identity headers against the shared secret and the clock."""

    def __init__(self, secret: str, max_skew: float = DEFAULT_MAX_SKEW, clock: Callable[[], float] = time.time) -> None:
        self._key = secret.encode()
        self.max_skew = check_skew(max_skew)
        self.clock = clock

    def verify(self, scope: MutableMapping[str, Any]) -> SignedCaller:
        """The signed caller of an ASGI request; PolicyError 400 for repeated signing headers, 401 for
        missing, malformed, mis-signed, stale or future ones."""
        values = _signing_headers(scope["headers"])
        missing = [name for name in SIGNED_HEADERS if name not in values]
        if missing:
            raise PolicyError(401, f"unsigned request: missing {', '.join(missing)} (trusted-gateway mode)")
        tier, account, stamp, signature = (values[name] for name in SIGNED_HEADERS)
        for name, value, pattern in (
            (TIER_HEADER, tier, NAME),
            (ACCOUNT_HEADER, account, NAME),
            (TIMESTAMP_HEADER, stamp, TIMESTAMP),
        ):
            if not pattern.fullmatch(value):
                raise PolicyError(401, f"malformed {name} header")
        expected = hmac.new(self._key, canonical(tier, account, stamp, scope["path"]), hashlib.sha256).hexdigest()
        if not (SIGNATURE.fullmatch(signature.lower()) and hmac.compare_digest(expected, signature.lower())):
            raise PolicyError(401, "invalid gateway signature (tier, account, timestamp and path must match)")
        age = self.clock() - int(stamp)
        if abs(age) > self.max_skew:
            when = "old" if age > 0 else "in the future"
            raise PolicyError(
                401, f"stale gateway signature: timestamp {abs(age):.0f} s {when} (allowed ±{self.max_skew:g} s)"
            )
        return SignedCaller(tier, account)

    def identify(self, scope: MutableMapping[str, Any], tiers: TierTable) -> Caller:
        """The caller of a signed request, as one of our own keys of the signed tier that names the
        signed account would be (the tiers file's ``accounts`` limits apply to it too). A tier
        the tiers file does not define is a 401, not a 403: no caller of ours is established, as for
        a revoked key (the gateway's table and ours disagree; the message says so)."""
        signed = self.verify(scope)
        tier = tiers.spec.tiers.get(signed.tier)
        if tier is None:
            raise PolicyError(401, f"signed tier {signed.tier!r} is not defined in this server's tiers file")
        return Caller(signed.key_id, signed.tier, tier, account=signed.account)


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
        raise PolicyError(400, f"{', '.join(repeated)}: the gateway must send each signing header once")
    return {k: v[0] for k, v in seen.items()}
