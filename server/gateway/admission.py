"""Admission: from a parsed generation request and the caller's tier, the request vLLM will run
(caps, usage reporting and the processor's arguments decided), or a refusal (Refusal).

A pure function over the typed request (server/gateway/request.py): every field is read as vLLM's model
coerced it, and the side channels are read the way vLLM's ``to_sampling_params`` turns them into
sampling parameters, so a value cannot mean one thing here and another to the engine.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass, replace
from typing import Any

from antidistill.proxy_worker.runtime.settings import RequestArgs
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.policy import decide, find_smuggled
from antidistill.server.gateway.request import GenerationRequest, Parsed, canonical
from antidistill.server.tiers import SideChannels, Tier
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

# refused on protected requests: beam search ranks candidates by vLLM's own per-step logprobs and
# its sub-requests do not carry vllm_xargs; prompt embeddings give the proxy no prompt tokens
PROTECTED_REFUSED = {"use_beam_search": "beam search", "prompt_embeds": "prompt embeddings"}
# set by a disaggregated-prefill router, never by a client: they reach the engine's KV connectors
ROUTER_ONLY = ("kv_transfer_params", "ec_transfer_params")
# the only vllm_xargs key a client may send: vLLM reads others (kv_transfer_params) from there too,
# and a custom processor's arguments are the operator's to set
CLIENT_XARGS = ("ad_lambda",)
SEED_UNSUPPORTED = (
    "per-request seed is not supported on this (CPU) server: vLLM's CPU build crashes the engine when a "
    "seeded request is prefilled in chunks"
)


@dataclass(frozen=True)
class Admission:
    """What the gateway decided: the request to forward, the processor's arguments, and what the
    limits, the response labels and the audit line must say."""

    request: GenerationRequest  # as vLLM will run it (``body`` adds the failure-ledger ticket)
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
    max_model_len: int | None = None,
    tenant_key: bytes | None = None,
    tenant: str = "",
    refuse_seeds: bool = False,
) -> Admission:
    """Decide on ``parsed`` for a caller of ``tier``; raises Refusal (403 or 400). With
    ``tenant_key``, the ``tenant``'s salt separates its prefix caches, the teacher's and the
    proxy's, from every other tenant's; ``max_model_len`` bounds output that no cap limits;
    ``refuse_seeds``: the engine cannot serve a per-request seed (GatewayConfig.refuse_seeds)."""
    if refuse_seeds and parsed.request.seed is not None:
        raise Refusal(400, SEED_UNSUPPORTED, "seed")
    smuggled = find_smuggled(parsed.raw)
    if smuggled:
        raise Refusal(403, f"{smuggled}: antidistillation arguments go in vllm_xargs only", smuggled)
    req = parsed.request
    for name in ROUTER_ONLY:
        if vars(req).get(name) is not None:
            raise Refusal(403, f"{name} is set by a prefill/decode router, not by clients", name)
    xargs = dict(req.vllm_xargs or {})
    decision = decide(tier_name, tier, xargs, lambda_header, escalated)
    for key in xargs:
        if key not in CLIENT_XARGS:
            allowed = ", ".join(CLIENT_XARGS)
            raise Refusal(400, f"vllm_xargs.{key}: not accepted by this server (allowed: {allowed})", key)
    if req.priority and not tier.allow_priority:
        raise Refusal(403, f"priority is not available on tier {tier_name!r} (allow_priority)", "priority")
    limit, update = output_limit(req, parsed.raw, tier)
    check_logprobs(req, tier.side_channels(decision.lam, escalated is not None))
    if decision.lam > 0:
        for name, what in PROTECTED_REFUSED.items():
            if vars(req).get(name) not in (None, False):  # a model field (chat has no prompt_embeds)
                raise Refusal(403, f"{what} ({name}) is not available on protected (λ > 0) requests", name)
    stream = bool(req.stream)
    asked_usage = bool(req.stream_options and req.stream_options.include_usage)
    running_usage = asked_usage and bool(req.stream_options.continuous_usage_stats)
    if stream:  # every chunk carries its choice's running count: a dropped stream is charged what it got
        update["stream_options"] = StreamOptions(include_usage=True, continuous_usage_stats=True)
    salt = None if tenant_key is None else tenant_salt(tenant_key, tenant, req.cache_salt)
    if salt is not None:
        update["cache_salt"] = salt
    on_failure = tier.on_protection_failure if decision.lam > 0 else "refuse"  # λ = 0: nothing can fail
    args = RequestArgs(decision.lam, decision.profile or "", on_failure=on_failure, salt=salt)
    update["vllm_xargs"] = args.to_xargs()
    admitted = req.model_copy(update=update)
    prompts = prompt_tokens(admitted)
    weight = len(prompts) * max(req.n or 1, 1)
    per_choice = [_output_room(limit, max_model_len, p) for p in prompts]
    output = sum(per_choice) * max(req.n or 1, 1)
    return Admission(
        admitted,
        args,
        escalated is not None,
        stream,
        stream and not asked_usage,
        running_usage,
        sum(prompts) + output,
        weight,
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


def output_limit(req: GenerationRequest, raw: dict[str, Any], tier: Tier) -> tuple[int | None, dict[str, int]]:
    """The output-token limit vLLM will apply (None: up to the context length) and the field to
    set when the client chose none and the tier has a cap. A client's own value over the cap → 403."""
    chat = isinstance(req, ChatCompletionRequest)
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    values = {name: vars(req)[name] for name in names}  # vars: chat's max_tokens warns when read
    cap = tier.max_tokens
    for name, value in values.items():
        if cap is not None and raw.get(name) is not None and value is not None and value > cap:
            raise Refusal(403, f"{name} {value} exceeds this tier's max_tokens {cap}", name)
    if cap is not None and all(raw.get(name) is None for name in names):
        return cap, {names[0]: cap}
    return next((v for v in values.values() if v is not None), None), {}


def check_logprobs(req: GenerationRequest, allowed: SideChannels) -> None:
    """The logprobs side channels for the decided λ. Sampled-token logprobs describe the protected
    distribution (processed mode) but still hand a distiller soft labels; prompt logprobs are
    always computed from the raw teacher (vLLM's prompt scoring skips logits processors)."""
    cap = allowed.max_logprobs
    sampled = sampled_logprobs(req)
    if sampled is not None and (cap == 0 or sampled > cap):
        raise Refusal(403, f"logprobs are limited to {cap} on this request (max_logprobs)", "logprobs")
    prompt = prompt_logprobs(req)
    if prompt is not None and not allowed.prompt_logprobs:
        message = "prompt logprobs are not allowed on this request (allow_prompt_logprobs)"
        raise Refusal(403, message, "prompt_logprobs")
    if prompt is not None and prompt > cap:
        message = f"prompt_logprobs are limited to {cap} on this request (max_logprobs)"
        raise Refusal(403, message, "prompt_logprobs")


def sampled_logprobs(req: GenerationRequest) -> float | None:
    """Logprobs per generated token that vLLM will return (None: none); ``-1`` (the whole
    vocabulary) is unlimited and each id in ``logprob_token_ids`` counts as one. A chat
    ``top_logprobs`` without ``logprobs`` counts too (vLLM refuses it; never let it through)."""
    if isinstance(req, ChatCompletionRequest):
        top = req.top_logprobs or 0
        count = _count(top) if req.logprobs or top else None
    else:
        count = None if req.logprobs is None else _count(req.logprobs)
    if req.logprob_token_ids:
        count = max(count or 0, len(req.logprob_token_ids))
    return count


def prompt_logprobs(req: GenerationRequest) -> float | None:
    """Prompt logprobs vLLM will compute (None: none): ``prompt_logprobs``, else with ``echo`` the
    sampled-token count (``logprobs`` on completions, ``top_logprobs`` on chat, whose default 0
    still scores the prompt)."""
    if req.prompt_logprobs is not None:
        return _count(req.prompt_logprobs)
    if not req.echo:
        return None
    fallback = req.top_logprobs if isinstance(req, ChatCompletionRequest) else req.logprobs
    return None if fallback is None else _count(fallback)


def prompt_tokens(req: GenerationRequest) -> list[int]:
    """A cheap upper-ish estimate of each prompt's tokens (4 characters of text per token, one per
    token id): one entry per prompt vLLM will run, so a list of prompts is counted per prompt."""
    if isinstance(req, ChatCompletionRequest):
        return [len(json.dumps(req.messages, default=str)) // 4 + 1]
    prompt = req.prompt
    parts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    return [len(p or "") // 4 + 1 if isinstance(p, str) or p is None else len(p) for p in parts]


def _count(value: int) -> float:
    return math.inf if value < 0 else value
