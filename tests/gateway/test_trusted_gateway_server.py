"""Trusted-gateway mode over HTTP: a real `antidistill serve --trust-gateway` on the tiny models,
sent what an upstream gateway sends. A signed request is served at the signed tier (judged by its
output tokens against the reference sampler), everything unsigned, mis-signed, stale or replayed is
refused — a signed header set is served once, for its own body, method and path — the tier's λ floor
and the account's tier allow-list hold, and the audit names the tier and the account."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from antidistill.benchmarks.tiny.reference import ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS, write_tiers
from antidistill.server.gateway.trusted_gateway import SECRET_ENV, SignedCaller, signed_headers

from tests.helpers import Server, audit_until, chat, completion, engine_fixture, tiny_server

SECRET = "trusted-gateway-test-secret-" + "0123456789abcdef" * 2
SKEW = 5  # seconds: short, so that the nonce window is short too
TIERS = {
    "free": {"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 64},
    "internal": {"lambda": 0.0},
    "limited": {"lambda": 1.0, "rpm": 2},
    "anonymous": {"lambda": 5.0},  # not for unsigned requests in this mode: only when the gateway signs it
}
ACCOUNTS = {
    "harvester": {"rpm": 3},  # across every tier the gateway signs for this account
    "team:restricted": {"tiers": ["free"]},  # the gateway may sign only free for it
}
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


def raw(body: dict) -> bytes:
    """The exact bytes sent (and signed): how a gateway serialises is its own business."""
    return json.dumps(body).encode()


def signed(tier: str, account: str, path: str = COMPLETIONS, body: bytes = b"", method: str = "POST", **kw) -> dict:
    return signed_headers(SECRET, tier, account, method, path, body, **kw)


def send(srv: Server, path: str, content: bytes, headers: Mapping[str, str] | list) -> httpx.Response:
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    return httpx.post(
        srv.base + path, content=content, headers=[("content-type", "application/json"), *items], timeout=120
    )


def post(
    srv: Server, path: str, body: dict, tier: str | None = None, account: str = "acme", extra: dict | None = None
) -> httpx.Response:
    """``body`` to ``path``, signed for ``tier`` and ``account`` (unsigned without a tier)."""
    content = raw(body)
    headers = signed(tier, account, path, content) if tier else {}
    return send(srv, path, content, {**headers, **(extra or {})})


@pytest.fixture(scope="module")
def reference(gateway: Server) -> ReferenceSampler:
    theta, grad = gateway.models.theta_and_grad("math")
    return ReferenceSampler(gateway.models.teacher, gateway.models.proxy, theta, grad, EPSILONS["math"])


def greedy(srv: Server, tier: str, extra: dict | None = None, **fields) -> httpx.Response:
    prompt = srv.models.tokenizer("Alice has 3 apples and buys")["input_ids"]
    body = completion(srv, prompt=prompt, max_tokens=8, ignore_eos=True, return_token_ids=True, **fields)
    return post(srv, COMPLETIONS, body, tier, extra=extra)


def message(res: httpx.Response) -> str:
    return res.json()["error"]["message"]


def test_signed_requests_are_served_at_the_signed_tier(gateway, reference):
    prompt = gateway.models.tokenizer("Alice has 3 apples and buys")["input_ids"]
    free = greedy(gateway, "free")
    assert free.status_code == 200, free.text
    assert free.headers["x-antidistillation-tier"] == "free" and free.headers["x-antidistillation-lambda"] == "3"
    assert free.json()["choices"][0]["token_ids"] == reference.generate(prompt, 3.0, 8), "served at the free λ"
    internal = greedy(gateway, "internal")
    assert internal.headers["x-antidistillation-lambda"] == "0"
    assert internal.json()["choices"][0]["token_ids"] == reference.generate(prompt, 0.0, 8), "unprotected"
    answer = post(gateway, CHAT, chat(gateway), "free")
    assert answer.status_code == 200 and answer.headers["x-antidistillation-lambda"] == "3", answer.text
    walk_in = post(gateway, COMPLETIONS, completion(gateway, max_tokens=2), "anonymous", "walk-in")
    assert (
        walk_in.headers["x-antidistillation-tier"] == "anonymous"
        and walk_in.headers["x-antidistillation-lambda"] == "5"
    )
    assert "trusted-gateway mode: callers are named by signed" in gateway.log.read_text()


def test_a_signed_request_is_served_once_for_its_own_body_and_path(gateway):
    body = raw(completion(gateway, max_tokens=2))
    headers = signed("internal", "acme", COMPLETIONS, body)
    fresh = send(gateway, COMPLETIONS, body, headers)
    assert fresh.status_code == 200, fresh.text
    again = send(gateway, COMPLETIONS, body, headers)
    assert again.status_code == 401 and "replayed gateway signature" in message(again), again.text
    harvest = raw(completion(gateway, prompt="Write out your reasoning in full", max_tokens=2))
    other_body = send(gateway, COMPLETIONS, harvest, signed("internal", "acme", COMPLETIONS, body))
    assert other_body.status_code == 401 and "does not cover this body" in message(other_body), other_body.text
    captured = signed("internal", "acme", COMPLETIONS, body)
    other_path = send(gateway, CHAT, body, captured)
    assert other_path.status_code == 401 and "invalid gateway signature" in message(other_path), other_path.text
    assert send(gateway, COMPLETIONS, body, captured).status_code == 200, "refusals elsewhere did not spend it"
    reformatted = json.dumps(json.loads(body), indent=1).encode()  # the same JSON object, other bytes
    res = send(gateway, COMPLETIONS, reformatted, signed("internal", "acme", COMPLETIONS, body))
    assert res.status_code == 401 and "does not cover this body" in message(res), "the exact bytes are signed"
    assert send(gateway, COMPLETIONS, body, signed("internal", "acme", COMPLETIONS, body)).status_code == 200


def test_signed_reads_are_single_use_too(gateway):
    models = signed("internal", "acme", "/v1/models", method="GET")
    first = httpx.get(gateway.base + "/v1/models", headers=models)
    assert first.status_code == 200 and first.json()["data"][0]["id"] == gateway.model, first.text
    again = httpx.get(gateway.base + "/v1/models", headers=models)
    assert again.status_code == 401 and "replayed gateway signature" in message(again)
    as_post = httpx.post(gateway.base + "/v1/models", headers=signed("internal", "acme", "/v1/models", method="GET"))
    assert as_post.status_code == 401 and "invalid gateway signature" in message(as_post), "signed for GET"
    stuffed = httpx.request(
        "GET",
        gateway.base + "/v1/models",
        content=b"{}",
        headers=signed("internal", "acme", "/v1/models", method="GET"),
    )
    assert stuffed.status_code == 401 and "does not cover this body" in message(stuffed)
    assert httpx.get(gateway.base + "/v1/models").status_code == 401


def test_unsigned_mis_signed_and_stale_requests_are_401(gateway):
    body = raw(completion(gateway, max_tokens=2))
    good = signed("internal", "acme", COMPLETIONS, body)
    v1 = {k: v for k, v in good.items() if k not in ("X-Antidistill-Nonce", "X-Antidistill-Body-Sha256")}
    cases = [
        ("unsigned request", {}),  # though the tiers file has an anonymous tier
        ("unsigned request", gateway.auth("internal")),  # one of our own keys is not read in this mode
        ("unsigned request: missing x-antidistill-nonce", v1),  # a version-1 header set
        (
            "invalid gateway signature",
            signed_headers("another-secret-" + "f" * 40, "internal", "acme", "POST", COMPLETIONS, body),
        ),
        ("invalid gateway signature", {**good, "X-Antidistill-Tier": "free"}),  # signed internal, presented free
        ("invalid gateway signature", {**good, "X-Antidistill-Nonce": "a-fresh-nonce-of-my-own"}),
        ("invalid gateway signature", signed("internal", "acme", CHAT, body)),  # signed for another route
        ("stale gateway signature", signed("internal", "acme", COMPLETIONS, body, now=time.time() - SKEW - 3)),
        ("in the future", signed("internal", "acme", COMPLETIONS, body, now=time.time() + SKEW + 60)),
        ("is not defined in this server's tiers file", signed("platinum", "acme", COMPLETIONS, body)),
    ]
    for needle, headers in cases:
        res = send(gateway, COMPLETIONS, body, headers)
        assert res.status_code == 401 and needle in message(res), (needle, res.text)
    twice = [*signed("internal", "acme", COMPLETIONS, body).items(), ("X-Antidistill-Tier", "free")]
    dup = send(gateway, COMPLETIONS, body, twice)
    assert dup.status_code == 400 and "2 x-antidistill-tier headers" in message(dup), dup.text


def test_an_accounts_tier_allow_list_holds(gateway):
    body = completion(gateway, max_tokens=2)
    allowed = post(gateway, COMPLETIONS, body, "free", "team:restricted")
    assert allowed.status_code == 200, allowed.text
    refused = post(gateway, COMPLETIONS, body, "internal", "team:restricted")
    assert refused.status_code == 403, refused.text
    assert "'internal' is not allowed for account 'team:restricted' (its tiers: free)" in message(refused)
    assert post(gateway, COMPLETIONS, body, "internal", "restricted").status_code == 200, "another account"


def test_a_signed_tier_cannot_go_below_its_floor(gateway, reference):
    body = completion(gateway, max_tokens=2)
    for attempt, headers in (
        ({"vllm_xargs": {"ad_lambda": 0}}, {}),
        ({"vllm_xargs": {"ad_lambda": 2.9}}, {}),
        ({}, {"X-Antidistillation-Lambda": "0"}),
    ):
        res = post(gateway, COMPLETIONS, {**body, **attempt}, "free", extra=headers)
        assert res.status_code == 403 and "allowed range [3, 6]" in message(res), res.text
    inside = post(gateway, COMPLETIONS, {**body, "vllm_xargs": {"ad_lambda": 5}}, "free")
    assert inside.status_code == 200 and inside.headers["x-antidistillation-lambda"] == "5"
    # an internal key of ours beside a free signature: the signature decides, λ stays at the free floor
    prompt = gateway.models.tokenizer("Alice has 3 apples and buys")["input_ids"]
    mixed = greedy(gateway, "free", extra=gateway.auth("internal"))
    assert mixed.headers["x-antidistillation-tier"] == "free"
    assert mixed.json()["choices"][0]["token_ids"] == reference.generate(prompt, 3.0, 8)
    capped = post(gateway, COMPLETIONS, {**body, "max_tokens": 65}, "free")
    assert capped.status_code == 403 and "max_tokens" in message(capped), "the tier's caps apply"


def test_limits_follow_the_signed_account(gateway):
    body = completion(gateway, max_tokens=2)
    for _ in range(2):
        assert post(gateway, COMPLETIONS, body, "limited", "collector").status_code == 200
    limited = post(gateway, COMPLETIONS, body, "limited", "collector")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert post(gateway, COMPLETIONS, body, "limited", "someone-else").status_code == 200
    # the tiers file's account limits apply to a signed account as to our keys naming it, whatever the tier
    for tier in ("internal", "free", "internal"):
        assert post(gateway, COMPLETIONS, body, tier, "harvester").status_code == 200
    over = post(gateway, COMPLETIONS, body, "free", "harvester")
    assert over.status_code == 429 and "account 'harvester'" in message(over), over.text


def test_audit_names_the_signed_tier_and_account(gateway):
    plain = post(gateway, COMPLETIONS, completion(gateway, max_tokens=2), "free", "audited-account")
    chatted = post(gateway, CHAT, chat(gateway, max_tokens=2), "free", "audited-account")
    assert plain.status_code == chatted.status_code == 200, (plain.text, chatted.text)
    key_id = SignedCaller("free", "audited-account").key_id

    def served_of(lines: list[dict]) -> list[dict]:
        return [x for x in lines if x["key_id"] == key_id and x["status"] == 200]

    lines = audit_until(gateway, lambda lines: {x["path"] for x in served_of(lines)} >= {COMPLETIONS, CHAT})
    served = served_of(lines)
    assert served and served[-1]["tier"] == "free" and served[-1]["lambda"] == 3.0, lines[-3:]
    assert {x["path"] for x in served} == {COMPLETIONS, CHAT} and all(x["account"] == "audited-account" for x in served)
    refused = [x for x in lines if x["status"] == 401 and x["key_id"] == "none"]
    assert refused and all(x["tier"] is None and x["account"] is None for x in refused)
    replays = [x for x in lines if x["status"] == 401 and x["key_id"] != "none"]
    assert replays and all(x["account"] for x in replays), "a replay is audited against the account it names"
