"""A generation request read exactly the way vLLM's OpenAI routes read it, parsed once.

The route decides the request model (vLLM 0.32's own class for the route: server/gateway/apis/),
never the body's shape; validation is FastAPI's (lax pydantic: ``"200"`` → 200, ``false`` → 0 for an integer field,
``"false"`` → False). Policy reads the typed fields, and what is forwarded is the canonical
serialisation of the object the policy decided on (``canonical``): re-parsed by vLLM it yields
the same object, so vLLM runs nothing the gateway did not see.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from antidistill.server.gateway.apis import Api, api_for
from antidistill.server.gateway.errors import Refusal
from pydantic import BaseModel, ValidationError
from vllm.entrypoints.serve.exception_handling.handlers.validation import clean_loc_for_param
from vllm.exceptions import VLLMValidationError

MAX_DEPTH = 64  # JSON nesting; tool schemas and content parts need far less, recursion limits far more
BYTES_PER_TOKEN = 64  # a token of JSON-escaped text or of a token-id list, generously
BODY_SLACK = 1 << 20  # the other fields: tools, schemas, options


@dataclass(frozen=True)
class Parsed:
    """The request as vLLM will read it, the JSON it came from (for key-name checks only), and its API."""

    request: BaseModel
    raw: dict[str, Any]
    api: Api


def parse(route: str, raw: bytes) -> Parsed:
    """Parse ``raw`` with vLLM's model for ``route``, as vLLM will read the forwarded canonical form;
    a body vLLM would refuse → 400 (Refusal)."""
    if not raw:
        raise Refusal(400, "request body is missing: a JSON object is required")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Refusal(400, f"request body is not valid JSON ({exc})") from None
    except RecursionError:  # found with hostile inputs: a deeply nested body was a 500
        raise Refusal(400, f"request body is nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(body, dict):
        raise Refusal(400, "request body must be a JSON object")
    if _too_deep(body):
        raise Refusal(400, f"request body is nested more than {MAX_DEPTH} levels deep")
    if body.get("structured_outputs") is not None and not isinstance(body["structured_outputs"], dict):
        # found by fuzzing: vLLM 0.32's validator calls .get on it (AttributeError → 500)
        raise Refusal(400, "structured_outputs must be an object", "structured_outputs")
    api = api_for(route)
    model = api.model
    # vLLM's "before" validators edit messages in place (reasoning_content → reasoning): no key
    # name that matters to the policy changes, so the raw body need not be copied. They also read
    # the raw JSON ("false" is truthy there): the canonical form must pass them too, and it is
    # what vLLM will read, so it is what the policy reads.
    return Parsed(validate(model, canonical(validate(model, body))), body, api)


def validate(model: type[BaseModel], body: dict[str, Any]) -> BaseModel:
    """What FastAPI does with the body of vLLM's route (``validate_python(..., from_attributes=True)``),
    with vLLM's refusals as 400s."""
    try:
        return model.model_validate(body, from_attributes=True)
    except ValidationError as exc:
        raise Refusal(400, *validation_message(exc)) from None
    except VLLMValidationError as exc:  # raised by vLLM's "before" validators, not wrapped by pydantic
        raise Refusal(400, exc.args[0] if exc.args else str(exc), exc.parameter) from None
    except (ValueError, TypeError, OverflowError, AttributeError, LookupError, RecursionError) as exc:
        # vLLM's "before" validators read the raw body and crash on shapes they do not expect (found
        # by fuzzing: a tool without function.name is a KeyError): the request's fault, never a 500
        raise Refusal(400, f"invalid request: {type(exc).__name__} {exc}") from None


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """The first pydantic error as one line (``field: message``) and the field it names."""
    errors = exc.errors(include_url=False)
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = clean_loc_for_param(tuple(first["loc"])) if first["loc"] else None
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{param or 'body'}: {first['msg']}{more}", param


def canonical(request: BaseModel) -> dict[str, Any]:
    """The JSON vLLM is sent: the fields the client set (or the gateway decided), coerced; fields
    vLLM's model does not know are dropped, since vLLM ignores them."""
    return request.model_dump(mode="json", exclude_unset=True, exclude=set(request.model_extra or ()))


def max_body_bytes(max_model_len: int | None, override: int | None = None) -> int:
    """The largest request body read: ``override`` (bytes) if set, else room for a full context
    of generously escaped text plus the other fields."""
    return override or BYTES_PER_TOKEN * (max_model_len or 32768) + BODY_SLACK


def _too_deep(body: Any) -> bool:
    """Nesting beyond MAX_DEPTH, checked without recursion (our policy walk and vLLM's parsers recurse)."""
    level = [body]
    for _ in range(MAX_DEPTH):
        level = [
            child
            for node in level
            if isinstance(node, dict | list)
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True
