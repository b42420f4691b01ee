"""One caller per request: the request's single API key, or a refusal naming the ambiguity."""

from __future__ import annotations

import urllib.parse
from collections.abc import MutableMapping
from typing import Any

from antidistill.server.gateway.errors import Refusal

# where clients put API keys besides Authorization (Azure- and Anthropic-style SDKs, URLs): refused,
# so that we, a front proxy and vLLM's own --api-key check cannot disagree about who the caller is
KEY_HEADERS = (b"api-key", b"x-api-key")
KEY_PARAMS = ("api_key", "api-key", "apikey", "key")


def bearer(scope: MutableMapping[str, Any]) -> str | None:
    """The request's one API key (None: none). More than one credential (a repeated Authorization
    header: ASGI keeps every copy, a dict keeps the last, a front proxy may read the first; or a key
    in another header or the query string) is a 400; a scheme other than Bearer is a 401."""
    auth = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
    if len(auth) > 1:
        raise Refusal(400, f"{len(auth)} Authorization headers: send exactly one credential")
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    elsewhere = [k.decode("latin-1").lower() + " header" for k, _ in scope["headers"] if k.lower() in KEY_HEADERS]
    elsewhere += [f"query parameter {name}" for name in KEY_PARAMS if name in query]
    if elsewhere:
        where = ", ".join(elsewhere)
        raise Refusal(400, f"credential in {where}: send exactly one, as Authorization: Bearer <key>")
    if not auth:
        return None
    scheme, _, key = auth[0].decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Refusal(401, f"unsupported authorization scheme {scheme[:20]!r}: use Bearer <key>")
    return key.strip() or None
