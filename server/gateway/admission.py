"""Admission: from a parsed generation request and the caller's tier, the request vLLM will run
(caps, usage reporting and the processor's arguments decided), or a refusal (Refusal).

A pure function over the typed request (server/gateway/request.py): every field is read as vLLM's model
coerced it — for the Messages API, from vLLM's own conversion to the chat request it runs — and the
side channels are read the way vLLM's ``to_sampling_params`` turns them into sampling parameters
(server/gateway/apis/), so a value cannot mean one thing here and another to the engine.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace
from typing import Any

from antidistill.proxy_worker.runtime.settings import RequestArgs
from antidistill.server.gateway.apis import Api
from antidistill.server.gateway.apis.responses import Owner
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.policy import decide, find_smuggled, watermarking
from antidistill.server.gateway.request import Parsed, canonical
from antidistill.server.tiers import SideChannels, Tier
from pydantic import BaseModel

# refused on protected requests: beam search ranks candidates by vLLM's own per-step logprobs and
# its sub-requests do not carry vllm_xargs; prompt embeddings give the proxy no prompt tokens
PROTECTED_REFUSED = {"use_beam_search": "beam search", "prompt_embeds": "prompt embeddings"}
# set by a disaggregated-prefill router, never by a client: they reach the engine's KV connectors
ROUTER_ONLY = ("kv_transfer_params", "ec_transfer_params")
# the only vllm_xargs key a client may send: vLLM reads others (kv_transfer_params) from there too,
# and a custom processor's arguments are the operator's to set
CLIENT_XARGS = ("ad_lambda", "ad_strength")
SEED_UNSUPPORTED = (
    "per-request seed is not supported on this (CPU) server: vLLM's CPU build crashes the engine when a "
    "seeded request is prefilled in chunks"
)


@dataclass(frozen=True)
class Admission:
    """What the gateway decided: the request to forward, the processor's arguments, and what the
    limits, the response labels and the audit line must say."""

    request: BaseModel  # as vLLM will run it (``body`` adds the failure-ledger ticket)
    args: RequestArgs  # λ, profile, failure policy and tenant salt, for the worker
    escalated: bool  # λ was decided under the key's or account's escalation floor
    stream: bool
    hide_usage: bool  # usage is reported for exact counting; the client did not ask for it
    running_usage: bool  # the client asked for every chunk's usage (continuous_usage_stats) itself
    budget: int  # tokens counted against the tier's tpm: prompts + output limit × prompts × n
    weight: int  # requests counted against rpm and in-flight limits: prompts × n
    output_budget: int  # the most output tokens vLLM may produce for it (charged when nothing is known)
    strength: float | None = None  # λ·s on the applied profile (None: its gradient stores no Δ scale)

    @property
    def lam(self) -> float:
        return self.args.lam

    @property
    def profile(self) -> str | None:
        return self.args.profile or None

    def body(self, ticket: int | None = None) -> dict[str, Any]:
        """The JSON vLLM is sent: the request's canonical form, whose ``vllm_xargs`` are the
        processor's arguments with the failure-ledger ticket the guard watches."""
        return {**canonical(self.request), "vllm_xargs": replace(self.args, ticket=ticket).to_xargs()}


def admit(
    parsed: Parsed,
    tier_name: str,
    tier: Tier,
    lambda_header: str | None,
    escalated: float | None = None,
    *,
    strength_header: str | None = None,
    scale: float | None = None,
    max_model_len: int | None = None,
    tenant_key: bytes | None = None,
    tenant: str = "",
    refuse_seeds: bool = False,
) -> Admission:
    """Decide on ``parsed`` for a caller of ``tier``; raises Refusal (403 or 400). With
    ``tenant_key``, the ``tenant``'s salt separates its prefix caches, the teacher's and the
    proxy's, from every other tenant's; ``max_model_len`` bounds output that no cap limits;
    ``scale``: the tier's profile's Δ scale, for strength requests; ``refuse_seeds``: the engine
    cannot serve a per-request seed (GatewayConfig.refuse_seeds)."""
    api, req = parsed.api, parsed.request
    view = api.view(req)  # what the engine will run: every field below is read from it
    if refuse_seeds and getattr(view, "seed", None) is not None:
        raise Refusal(400, SEED_UNSUPPORTED, "seed")
    smuggled = find_smuggled(parsed.raw)
    if smuggled:
        raise Refusal(403, f"{smuggled}: antidistillation arguments go in vllm_xargs only", smuggled)
    for name in ROUTER_ONLY:
        if vars(view).get(name) is not None:
            raise Refusal(403, f"{name} is set by a prefill/decode router, not by clients", name)
    xargs = dict(view.vllm_xargs or {})
    decision = decide(tier_name, tier, xargs, lambda_header, escalated, strength_header=strength_header, scale=scale)
    for key in xargs:
        if key not in CLIENT_XARGS:
            allowed = ", ".join(CLIENT_XARGS)
            raise Refusal(400, f"vllm_xargs.{key}: not accepted by this server (allowed: {allowed})", key)
    if getattr(view, "priority", 0) and not tier.allow_priority:
        raise Refusal(403, f"priority is not available on tier {tier_name!r} (allow_priority)", "priority")
    limit, update = output_limit(api, view, parsed.raw, tier)
    check_logprobs(api, view, tier.side_channels(decision.lam, escalated is not None))
    protected = decision.lam > 0
    if protected:
        for name, what in PROTECTED_REFUSED.items():
            if vars(view).get(name) not in (None, False):  # a model field (chat has no prompt_embeds)
                raise Refusal(403, f"{what} ({name}) is not available on protected (λ > 0) requests", name)
    salt = None if tenant_key is None else tenant_salt(tenant_key, tenant, view.cache_salt)
    update.update(api.checks(req, parsed.raw, protected, Owner.of(tenant_key, tenant)))
    stream = bool(view.stream)
    asked_usage, running_usage = False, False
    if stream:  # the stream counts what it sends: a dropped one is charged what it got
        fields, asked_usage, running_usage = api.stream_fields(view)
        update.update(fields)
    if salt is not None:
        update["cache_salt"] = salt
    forced = watermarking(tier, view.watermarking)
    if forced != view.watermarking:
        update["watermarking"] = forced
    on_failure = tier.on_protection_failure if protected else "refuse"  # λ = 0: nothing can fail
    tier_label = tier_name if protected else ""  # the worker's dose metric; λ = 0 has none
    args = RequestArgs(decision.lam, decision.profile or "", on_failure=on_failure, salt=salt, tier=tier_label)
    update["vllm_xargs"] = args.to_xargs()
    admitted = req.model_copy(update=update)
    prompts = api.prompt_tokens(view)
    choices = api.choices(view)
    per_choice = [_output_room(limit, max_model_len, p) for p in prompts]
    output = sum(per_choice) * choices
    return Admission(
        admitted,
        args,
        escalated is not None,
        stream,
        stream and not asked_usage,
        running_usage,
        sum(prompts) + output,
        len(prompts) * choices,
        output,
    )


def tenant_salt(key: bytes, tenant: str, client_salt: str | None = None) -> str:
    """The ``cache_salt`` of a tenant's requests: a keyed digest, so no tenant can name another's
    (or guess it from its name), folded with the client's own salt, which still splits its cache."""
    message = f"{tenant}\n{client_salt or ''}".encode()
    return "t" + hmac.new(key, message, hashlib.sha256).hexdigest()[:40]


def _output_room(limit: int | None, max_model_len: int | None, prompt: int) -> int:
    """Output tokens one choice may produce: its limit, else what the context leaves after the prompt."""
    if limit is not None:
        return max(limit, 0)
    return max((max_model_len or 0) - prompt, 1)


def output_limit(api: Api, view: BaseModel, raw: dict[str, Any], tier: Tier) -> tuple[int | None, dict[str, int]]:
    """The output-token limit vLLM will apply (None: up to the context length) and the field to
    set when the client chose none and the tier has a cap. A client's own value over the cap → 403."""
    names = api.limits.fields
    values = {name: vars(view)[name] for name in names}  # vars: chat's max_tokens warns when read
    cap = tier.max_tokens
    for name, value in values.items():
        if cap is not None and raw.get(name) is not None and value is not None and value > cap:
            raise Refusal(403, f"{name} {value} exceeds this tier's max_tokens {cap}", name)
    if cap is not None and all(raw.get(name) is None for name in names) and api.limits.cap_field:
        return cap, {api.limits.cap_field: cap}
    return next((v for v in values.values() if v is not None), None), {}


def check_logprobs(api: Api, view: BaseModel, allowed: SideChannels) -> None:
    """The logprobs side channels for the decided λ. Sampled-token logprobs describe the protected
    distribution (processed mode) but still hand a distiller soft labels; prompt logprobs are
    always computed from the raw teacher (vLLM's prompt scoring skips logits processors)."""
    cap = allowed.max_logprobs
    sampled = api.sampled_logprobs(view)
    if sampled is not None and (cap == 0 or sampled > cap):
        raise Refusal(403, f"logprobs are limited to {cap} on this request (max_logprobs)", "logprobs")
    prompt = api.prompt_logprobs(view)
    if prompt is not None and not allowed.prompt_logprobs:
        message = "prompt logprobs are not allowed on this request (allow_prompt_logprobs)"
        raise Refusal(403, message, "prompt_logprobs")
    if prompt is not None and prompt > cap:
        message = f"prompt_logprobs are limited to {cap} on this request (max_logprobs)"
        raise Refusal(403, message, "prompt_logprobs")
