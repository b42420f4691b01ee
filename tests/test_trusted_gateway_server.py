"""Trusted-gateway mode over HTTP: a real `antidistill serve --trust-gateway` on the tiny models,
sent what an upstream gateway sends. A signed request is served at the signed tier (judged by its
output tokens against the reference sampler), everything unsigned, mis-signed or replayed late is
refused, the tier's λ floor holds, and the audit names the tier and the account."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from antidistill.benchmarks.tiny.reference import ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS, write_tiers
from antidistill.server.trusted_gateway import SECRET_ENV, SignedCaller, signed_headers

from tests.helpers import Server, audit_until, chat, completion, engine_fixture, tiny_server

SECRET = "trusted-gateway-test-secret-" + "0123456789abcdef" * 2
SKEW = 5  # seconds: short, so that a replay can be shown stale without a long wait
TIERS = {
    "free": {"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 64},
    "internal": {"lambda": 0.0},
    "limited": {"lambda": 1.0, "rpm": 2},
    "anonymous": {"lambda": 5.0},  # not for unsigned requests in this mode: only when the gateway signs it
}
ACCOUNTS = {"harvester": {"rpm": 3}}  # across every tier the gateway signs for this account
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


def tiers_with_accounts(path: Path, tiers: Mapping[str, Any]) -> dict[str, str]:
    """The tiers file with an ``accounts`` section (keys are written, and unused in this mode)."""
    keys = write_tiers(path, tiers)
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "accounts": ACCOUNTS}))
    return keys


@engine_fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("trusted-gateway")
    args = ["--trust-gateway", "--gateway-max-skew", str(SKEW)]  # the secret from the environment
    with tiny_server(root, TIERS, extra_args=args, env={SECRET_ENV: SECRET}, write=tiers_with_accounts) as server:
        yield server


def post(srv: Server, path: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(srv.base + path, json=body, headers=headers or {}, timeout=120)


def signed(tier: str, account: str, path: str = COMPLETIONS, **kw: float) -> dict[str, str]:
    return signed_headers(SECRET, tier, account, path, **kw)


@pytest.fixture(scope="module")
def reference(gateway: Server) -> ReferenceSampler:
    theta, grad = gateway.models.theta_and_grad("math")
    return ReferenceSampler(gateway.models.teacher, gateway.models.proxy, theta, grad, EPSILONS["math"])


def greedy(srv: Server, headers: dict[str, str], **fields) -> httpx.Response:
    prompt = srv.models.tokenizer("Alice has 3 apples and buys")["input_ids"]
    body = completion(srv, prompt=prompt, max_tokens=8, ignore_eos=True, return_token_ids=True, **fields)
    return post(srv, COMPLETIONS, body, headers)


def test_signed_requests_are_served_at_the_signed_tier(gateway, reference):
    prompt = gateway.models.tokenizer("Alice has 3 apples and buys")["input_ids"]
    free = greedy(gateway, signed("free", "acme"))
    assert free.status_code == 200, free.text
    assert free.headers["x-antidistillation-tier"] == "free" and free.headers["x-antidistillation-lambda"] == "3"
    assert free.json()["choices"][0]["token_ids"] == reference.generate(prompt, 3.0, 8), "served at the free λ"
    internal = greedy(gateway, signed("internal", "acme"))
    assert internal.headers["x-antidistillation-lambda"] == "0"
    assert internal.json()["choices"][0]["token_ids"] == reference.generate(prompt, 0.0, 8), "unprotected"
    answer = post(gateway, CHAT, chat(gateway), signed("free", "acme", CHAT))
    assert answer.status_code == 200 and answer.headers["x-antidistillation-lambda"] == "3", answer.text
    walk_in = post(gateway, COMPLETIONS, completion(gateway, max_tokens=2), signed("anonymous", "walk-in"))
    assert (
        walk_in.headers["x-antidistillation-tier"] == "anonymous"
        and walk_in.headers["x-antidistillation-lambda"] == "5"
    )
    assert "trusted-gateway mode: callers are named by signed" in gateway.log.read_text()


def test_unsigned_mis_signed_and_replayed_late_requests_are_401(gateway):
    body = completion(gateway, max_tokens=2)
    good = signed("internal", "acme")
    cases = [
        ("unsigned request", {}),  # though the tiers file has an anonymous tier
        ("unsigned request", gateway.auth("internal")),  # one of our own keys is not read in this mode
        ("invalid gateway signature", signed_headers("another-secret-" + "f" * 40, "internal", "acme", COMPLETIONS)),
        ("invalid gateway signature", {**good, "X-Antidistill-Tier": "free"}),  # signed internal, presented free
        ("invalid gateway signature", signed("internal", "acme", CHAT)),  # signed for another route
        ("in the future", signed("internal", "acme", now=time.time() + SKEW + 60)),
        ("is not defined in this server's tiers file", signed("platinum", "acme")),
    ]
    for needle, headers in cases:
        res = post(gateway, COMPLETIONS, body, headers)
        assert res.status_code == 401 and needle in res.json()["error"]["message"], (needle, res.text)
    replayed = signed("internal", "acme")
    assert post(gateway, COMPLETIONS, body, replayed).status_code == 200
    time.sleep(SKEW + 1.5)
    late = post(gateway, COMPLETIONS, body, replayed)
    assert late.status_code == 401 and "stale gateway signature" in late.json()["error"]["message"], late.text
    twice = [*signed("internal", "acme").items(), ("X-Antidistill-Tier", "free")]
    dup = httpx.post(gateway.base + COMPLETIONS, json=body, headers=twice, timeout=60)
    assert dup.status_code == 400 and "2 x-antidistill-tier headers" in dup.json()["error"]["message"], dup.text
    assert httpx.get(gateway.base + "/v1/models").status_code == 401
    models = httpx.get(gateway.base + "/v1/models", headers=signed("internal", "acme", "/v1/models"))
    assert models.status_code == 200 and models.json()["data"][0]["id"] == gateway.model


def test_a_signed_tier_cannot_go_below_its_floor(gateway, reference):
    body = completion(gateway, max_tokens=2)
    for attempt, headers in (
        ({"vllm_xargs": {"ad_lambda": 0}}, {}),
        ({"vllm_xargs": {"ad_lambda": 2.9}}, {}),
        ({}, {"X-Antidistillation-Lambda": "0"}),
    ):
        res = post(gateway, COMPLETIONS, {**body, **attempt}, {**signed("free", "acme"), **headers})
        assert res.status_code == 403 and "allowed range [3, 6]" in res.json()["error"]["message"], res.text
    inside = post(gateway, COMPLETIONS, {**body, "vllm_xargs": {"ad_lambda": 5}}, signed("free", "acme"))
    assert inside.status_code == 200 and inside.headers["x-antidistillation-lambda"] == "5"
    # an internal key of ours beside a free signature: the signature decides, λ stays at the free floor
    prompt = gateway.models.tokenizer("Alice has 3 apples and buys")["input_ids"]
    mixed = greedy(gateway, {**signed("free", "acme"), **gateway.auth("internal")})
    assert mixed.headers["x-antidistillation-tier"] == "free"
    assert mixed.json()["choices"][0]["token_ids"] == reference.generate(prompt, 3.0, 8)
    capped = post(gateway, COMPLETIONS, {**body, "max_tokens": 65}, signed("free", "acme"))
    assert capped.status_code == 403 and "max_tokens" in capped.json()["error"]["message"], "the tier's caps apply"


def test_limits_follow_the_signed_account(gateway):
    body = completion(gateway, max_tokens=2)
    for _ in range(2):
        assert post(gateway, COMPLETIONS, body, signed("limited", "collector")).status_code == 200
    limited = post(gateway, COMPLETIONS, body, signed("limited", "collector"))
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert post(gateway, COMPLETIONS, body, signed("limited", "someone-else")).status_code == 200
    # the tiers file's account limits apply to a signed account as to our keys naming it, whatever the tier
    for tier in ("internal", "free", "internal"):
        assert post(gateway, COMPLETIONS, body, signed(tier, "harvester")).status_code == 200
    over = post(gateway, COMPLETIONS, body, signed("free", "harvester"))
    assert over.status_code == 429 and "account 'harvester'" in over.json()["error"]["message"], over.text


def test_audit_names_the_signed_tier_and_account(gateway):
    plain = post(gateway, COMPLETIONS, completion(gateway, max_tokens=2), signed("free", "audited-account"))
    chatted = post(gateway, CHAT, chat(gateway, max_tokens=2), signed("free", "audited-account", CHAT))
    assert plain.status_code == chatted.status_code == 200, (plain.text, chatted.text)
    key_id = SignedCaller("free", "audited-account").key_id

    def served_of(lines: list[dict]) -> list[dict]:
        return [x for x in lines if x["key_id"] == key_id and x["status"] == 200]

    lines = audit_until(gateway, lambda lines: {x["path"] for x in served_of(lines)} >= {COMPLETIONS, CHAT})
    served = served_of(lines)
    assert served and served[-1]["tier"] == "free" and served[-1]["lambda"] == 3.0, lines[-3:]
    assert {x["path"] for x in served} == {COMPLETIONS, CHAT} and all(x["account"] == "audited-account" for x in served)
    refused = [x for x in lines if x["status"] == 401]
    assert refused and all(x["tier"] is None and x["key_id"] == "none" and x["account"] is None for x in refused)
