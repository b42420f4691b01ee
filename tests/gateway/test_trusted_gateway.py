"""The trusted-gateway verifier on its own: what a signed request must carry to be believed (version-2
headers: body hash and nonce), that each signed request is served once (both nonce stores, Redis
against a real redis-server), the per-account tier allow-list, and the one-line refusals of a secret
that cannot work. (Over HTTP with a real server: test_trusted_gateway_server.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

import pytest
import yaml
from antidistill.benchmarks.tiny.serving import build_models
from antidistill.server.cli import main
from antidistill.server.gateway.config import GATEWAY_SKEW_ENV, GatewayConfig, GatewayConfigError
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.nonces import PREFIX, MemoryNonces, NonceStoreFull, RedisNonces, open_nonces
from antidistill.server.gateway.trusted_gateway import (
    DEFAULT_MAX_SKEW,
    EMPTY_SHA256,
    SECRET_ENV,
    GatewaySecretError,
    GatewayVerifier,
    SignedCaller,
    body_sha256,
    check_skew,
    resolve_secret,
    sign,
    signed_headers,
)
from antidistill.server.tiers import TiersError, TiersFile, TierTable
from pydantic import ValidationError

from tests.redis_server import RedisServer

SECRET = "s3cret-" + "x" * 40
PATH = "/v1/chat/completions"
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
NOW = 1_800_000_000.0
NONCE = "n0nce-0123456789abcdef"
TIERS = TierTable(
    TiersFile.model_validate(
        {
            "tiers": {"free": {"lambda": 3.0, "max_lambda": 6.0}, "internal": {"lambda": 0.0}},
            "accounts": {"team:acme": {"rpm": 10, "tiers": ["free"]}, "team:open": {"rpm": 10}},
        }
    ),
    "test",
)


def headers_for(tier: str = "free", account: str = "acme", path: str = PATH, body: bytes = BODY, **kw) -> dict:
    return signed_headers(SECRET, tier, account, kw.pop("method", "POST"), path, body, **{"now": NOW, **kw})


def scope(headers: dict[str, str] | list[tuple[str, str]], path: str = PATH, method: str = "POST") -> dict:
    items = headers.items() if isinstance(headers, dict) else headers
    return {"path": path, "method": method, "headers": [(k.lower().encode(), v.encode()) for k, v in items]}


def verifier(skew: float = 300.0, now: float = NOW, nonces=None) -> GatewayVerifier:
    return GatewayVerifier(SECRET, skew, clock=lambda: now, nonces=nonces)


def refused(headers, path: str = PATH, v: GatewayVerifier | None = None, method: str = "POST") -> Refusal:
    with pytest.raises(Refusal) as err:
        (v or verifier()).identify(scope(headers, path, method), TIERS)
    return err.value


def bind(v: GatewayVerifier, headers: dict, body: bytes = BODY, path: str = PATH, method: str = "POST") -> None:
    asyncio.run(v.bind(scope(headers, path, method), body))


def bind_refused(v: GatewayVerifier, headers: dict, body: bytes = BODY, path: str = PATH) -> Refusal:
    with pytest.raises(Refusal) as err:
        bind(v, headers, body, path)
    return err.value


def test_canonical_string_is_hmac_sha256_hex_over_eight_lines():
    digest = hashlib.sha256(BODY).hexdigest()
    message = f"v2\nfree\nacme\n1800000000\n{NONCE}\nPOST\n/v1/completions\n{digest}".encode()
    expected = hmac.new(SECRET.encode(), message, hashlib.sha256).hexdigest()
    fields = {"tier": "free", "account": "acme", "timestamp": "1800000000", "nonce": NONCE, "path": "/v1/completions"}
    assert sign(SECRET, **fields, method="POST", body_hash=digest) == expected
    headers = headers_for(path="/v1/completions", nonce=NONCE)
    assert headers["X-Antidistill-Signature"] == expected and headers["X-Antidistill-Body-Sha256"] == digest
    assert body_sha256(b"") == EMPTY_SHA256 == hashlib.sha256(b"").hexdigest()
    assert headers_for()["X-Antidistill-Nonce"] != headers_for()["X-Antidistill-Nonce"], "a fresh nonce each time"


def test_good_signature_identifies_the_signed_tier_and_account():
    caller = verifier().identify(scope(headers_for()), TIERS)
    assert caller.tier_name == "free" and caller.tier is TIERS.spec.tiers["free"]
    assert caller.key_id == SignedCaller("free", "acme").key_id and caller.account == "acme"
    assert caller.scope_id == SignedCaller("free", "acme").digest, "the limit state names it in full"
    within = verifier(now=NOW + 299).verify(scope(headers_for()))
    assert within == SignedCaller("free", "acme")
    upper = headers_for()
    upper["X-Antidistill-Signature"] = upper["X-Antidistill-Signature"].upper()
    upper["X-Antidistill-Body-Sha256"] = upper["X-Antidistill-Body-Sha256"].upper()
    assert verifier().verify(scope(upper)).account == "acme"


def test_account_id_is_stable_per_account_and_never_a_key_id():
    a, b = SignedCaller("free", "acme"), SignedCaller("internal", "acme")
    assert a.key_id == b.key_id, "one account: one set of limits whatever tier the gateway signs"
    assert a.digest == b.digest and len(a.digest) == 67, "named by the account's full digest"
    assert a.key_id != SignedCaller("free", "acme2").key_id
    assert a.key_id.startswith("gw-") and len(a.key_id) == 15  # our keys' ids are 12 hex digits


def test_unsigned_partly_signed_and_version_1_requests_are_401():
    err = refused({})
    assert err.status == 401 and "unsigned request" in err.message
    for header in ("X-Antidistill-Signature", "X-Antidistill-Nonce", "X-Antidistill-Body-Sha256"):
        partial = headers_for()
        del partial[header]
        err = refused(partial)
        assert err.status == 401 and f"missing {header.lower()}" in err.message, header
    err = refused({"Authorization": "Bearer ad-some-key-of-ours"})
    assert err.status == 401, "a bearer key is not a signature in trusted mode"
    stamp = str(int(NOW))
    v1 = hmac.new(SECRET.encode(), f"v1\nfree\nacme\n{stamp}\n{PATH}".encode(), hashlib.sha256).hexdigest()
    old = {"X-Antidistill-Tier": "free", "X-Antidistill-Account": "acme", "X-Antidistill-Timestamp": stamp}
    err = refused({**old, "X-Antidistill-Signature": v1})
    assert err.status == 401 and "missing x-antidistill-nonce, x-antidistill-body-sha256" in err.message
    padded = {**old, "X-Antidistill-Signature": v1, "X-Antidistill-Nonce": NONCE, "X-Antidistill-Body-Sha256": "0" * 64}
    assert "invalid gateway signature" in refused(padded).message, "a v1 signature is no v2 signature"


def test_wrong_secret_and_tampered_fields_are_401():
    other = signed_headers("another-secret-" + "y" * 40, "free", "acme", "POST", PATH, BODY, now=NOW)
    assert refused(other).message.startswith("invalid gateway signature")
    good = headers_for()
    for field, value in (
        ("X-Antidistill-Tier", "internal"),  # signed as free, presented as another tier
        ("X-Antidistill-Account", "someone-else"),
        ("X-Antidistill-Timestamp", str(int(NOW) + 1)),
        ("X-Antidistill-Nonce", "another-nonce-0123456789"),  # a fresh nonce on captured headers
        ("X-Antidistill-Body-Sha256", body_sha256(b'{"model":"m","prompt":"other"}')),  # another body's hash
        ("X-Antidistill-Signature", "0" * 64),
        ("X-Antidistill-Signature", "not-hex"),
    ):
        err = refused({**good, field: value})
        assert err.status == 401 and "invalid gateway signature" in err.message, field


def test_signature_is_bound_to_the_path_and_the_method():
    for_completions = headers_for(path="/v1/completions")
    err = refused(for_completions, PATH)
    assert err.status == 401 and "invalid gateway signature" in err.message
    assert verifier().verify(scope(for_completions, "/v1/completions")).tier == "free"
    models = headers_for(path="/v1/models", body=b"", method="GET")
    assert verifier().verify(scope(models, "/v1/models", "GET")).tier == "free"
    assert "invalid gateway signature" in refused(models, "/v1/models", method="POST").message


def test_stale_and_future_timestamps_are_401():
    old = refused(headers_for(now=NOW - 301))
    assert old.status == 401 and "stale gateway signature" in old.message and "301 s old" in old.message
    future = refused(headers_for(now=NOW + 301))
    assert future.status == 401 and "in the future" in future.message
    tight = verifier(skew=5)
    assert refused(headers_for(now=NOW - 6), v=tight).status == 401
    assert tight.verify(scope(headers_for(now=NOW - 5))).tier == "free"
    assert GatewayVerifier(SECRET).max_skew == DEFAULT_MAX_SKEW == 30.0


def test_malformed_values_are_401_before_any_hmac():
    good = headers_for()
    for field, value in (
        ("X-Antidistill-Timestamp", "1.8e9"),
        ("X-Antidistill-Timestamp", "-5"),
        ("X-Antidistill-Account", "two words"),
        ("X-Antidistill-Account", "a" * 129),
        ("X-Antidistill-Tier", ""),
        ("X-Antidistill-Nonce", "short"),
        ("X-Antidistill-Nonce", "n" * 65),
        ("X-Antidistill-Nonce", "has.a.dot.0123456789"),
        ("X-Antidistill-Body-Sha256", "abc"),
    ):
        err = refused({**good, field: value})
        assert err.status == 401 and f"malformed {field.lower()}" in err.message, (field, err.message)


def test_repeated_signing_headers_are_400():
    good = headers_for()
    twice = [*good.items(), ("X-Antidistill-Tier", "internal")]
    err = refused(twice)
    assert err.status == 400 and "2 x-antidistill-tier headers" in err.message
    same_twice = [*good.items(), ("x-antidistill-signature", good["X-Antidistill-Signature"])]
    assert refused(same_twice).status == 400, "even identical copies: exactly one of each"
    nonce_twice = [*good.items(), ("x-antidistill-nonce", "another-nonce-0123456789")]
    assert refused(nonce_twice).status == 400


def test_signed_tier_unknown_to_the_tiers_file_is_401():
    err = refused(headers_for("platinum"))
    assert err.status == 401 and "'platinum' is not defined" in err.message


def test_an_account_restricted_to_some_tiers_gets_403_for_others():
    assert verifier().identify(scope(headers_for("free", "team:acme")), TIERS).tier_name == "free"
    err = refused(headers_for("internal", "team:acme"))
    assert err.status == 403 and "'internal' is not allowed for account 'team:acme' (its tiers: free)" in err.message
    assert verifier().identify(scope(headers_for("internal", "team:open")), TIERS).tier_name == "internal"
    assert verifier().identify(scope(headers_for("internal", "acme")), TIERS).tier_name == "internal", (
        "an account the tiers file does not name is not restricted (namespaced gateway accounts never match "
        "a configured one by accident)"
    )
    with pytest.raises(ValidationError, match=r"accounts.acme.tiers: unknown tier 'gold'"):
        TiersFile.model_validate({"tiers": {"free": {"lambda": 1}}, "accounts": {"acme": {"tiers": ["free", "gold"]}}})


def test_tiers_file_allow_list_loads(tmp_path):
    from antidistill.server.tiers import load_tiers

    path = tmp_path / "tiers.yaml"
    path.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 1}}, "accounts": {"team:x": {"tiers": ["free"]}}}))
    assert load_tiers(path).account("team:x").tiers == ["free"]
    path.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 1}}, "accounts": {"team:x": {"tiers": ["pro"]}}}))
    with pytest.raises(TiersError, match="unknown tier 'pro'"):
        load_tiers(path)


def test_bind_serves_a_signed_request_once():
    v = verifier()
    good = headers_for()
    bind(v, good)
    err = bind_refused(v, good)
    assert err.status == 401 and "replayed gateway signature" in err.message, "same headers, same body"
    err = bind_refused(v, good, b'{"model":"m","prompt":"harvest this"}')
    assert err.status == 401 and "does not cover this body" in err.message, "same headers, another body"
    bind(v, headers_for())  # a fresh nonce is served
    empty = headers_for(path="/v1/models", body=b"", method="GET")
    bind(v, empty, b"", "/v1/models", "GET")
    with pytest.raises(Refusal, match="replayed"):
        bind(v, empty, b"", "/v1/models", "GET")


def test_bind_checks_the_body_before_using_up_the_nonce():
    v = verifier()
    good = headers_for()
    err = bind_refused(v, good, BODY + b" ")
    assert err.status == 401 and f"{len(BODY) + 1} body bytes" in err.message
    bind(v, good)  # a replay with another body did not spend the original request's nonce


def test_bind_verifies_the_headers_again():
    v = verifier()
    tampered = {**headers_for(), "X-Antidistill-Tier": "internal"}
    assert bind_refused(v, tampered).message.startswith("invalid gateway signature")
    assert len(v.nonces) == 0, "nothing unverified is remembered"


def test_nonces_are_remembered_until_their_signature_would_be_stale():
    clock = [NOW]
    store = MemoryNonces(clock=lambda: clock[0])
    v = GatewayVerifier(SECRET, 30, clock=lambda: clock[0], nonces=store)
    early = headers_for(now=NOW - 20)  # accepted for 10 s more
    bind(v, early)
    clock[0] = NOW + 9
    assert "replayed" in bind_refused(v, early).message
    clock[0] = NOW + 11.5
    assert len(store) == 0, "forgotten once the signature is stale"
    assert "stale gateway signature" in refused(early, v=v).message, "and then refused for its age"


def test_memory_store_is_bounded_and_fails_closed():
    clock = [0.0]
    store = MemoryNonces(max_entries=3, clock=lambda: clock[0])

    async def scenario():
        assert [await store.claim(f"n{i}", 10) for i in range(3)] == [True] * 3
        assert await store.claim("n1", 10) is False
        with pytest.raises(NonceStoreFull):
            await store.claim("n3", 10)
        clock[0] = 10.0
        assert await store.claim("n3", 10) is True, "expired entries make room"
        assert len(store) == 1

    asyncio.run(scenario())
    v = verifier(nonces=MemoryNonces(max_entries=1))
    bind(v, headers_for())
    err = bind_refused(v, headers_for())
    assert err.status == 503 and err.retry_after == 1 and "too many signed requests" in err.message


def test_memory_store_stays_bounded_under_churn():
    clock = [0.0]
    store = MemoryNonces(clock=lambda: clock[0])

    async def scenario():
        for i in range(20_000):
            clock[0] = i * 0.01
            assert await store.claim(f"nonce-{i}", 1.0)

    asyncio.run(scenario())
    assert len(store) <= 101 and len(store._expiries) <= 101


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis-nonces"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh_redis(redis_server):
    if redis_server.proc is None:
        redis_server.start()
    redis_server.client().flushall()
    return redis_server


def run_bounded(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_redis_store_is_shared_by_replicas_and_expires(fresh_redis):
    async def scenario():
        a, b = RedisNonces(fresh_redis.url), RedisNonces(fresh_redis.url)
        assert await a.claim("shared-nonce-0123", 0.5) is True
        assert await b.claim("shared-nonce-0123", 0.5) is False, "another replica sees the first claim"
        assert await a.claim("shared-nonce-0123", 0.5) is False
        ttl = fresh_redis.client().pttl(PREFIX + "shared-nonce-0123")
        assert 0 < ttl <= 500, "SET NX PX: Redis expires it"
        await asyncio.sleep(0.7)
        assert await b.claim("shared-nonce-0123", 10) is True, "expired with its window"
        await a.close()
        await b.close()

    run_bounded(scenario())
    assert set(fresh_redis.client().keys("*")) == {(PREFIX + "shared-nonce-0123").encode()}


def test_redis_store_behind_a_verifier_refuses_replays_on_another_replica(fresh_redis):
    async def scenario():
        one = GatewayVerifier(SECRET, 300, clock=lambda: NOW, nonces=RedisNonces(fresh_redis.url))
        two = GatewayVerifier(SECRET, 300, clock=lambda: NOW, nonces=RedisNonces(fresh_redis.url))
        good = headers_for()
        await one.bind(scope(good), BODY)
        with pytest.raises(Refusal, match="replayed gateway signature"):
            await two.bind(scope(good), BODY)
        await two.bind(scope(headers_for()), BODY)

    run_bounded(scenario())


def test_redis_outage_falls_back_to_this_process_and_logs_once(fresh_redis, caplog):
    async def scenario():
        store = RedisNonces(fresh_redis.url, timeout=0.1, backoff=0.0)
        assert await store.claim("before-outage-0123", 30) is True
        fresh_redis.pause()
        try:
            with caplog.at_level(logging.WARNING, "antidistill.server.gateway.nonces"):
                started = asyncio.get_running_loop().time()
                assert await store.claim("during-outage-0123", 30) is True
                assert await store.claim("during-outage-0123", 30) is False, "single use here while Redis is away"
                assert await store.claim("before-outage-0123", 30) is False, "claims made with Redis are mirrored"
                assert asyncio.get_running_loop().time() - started < 2, "each call bounded by its deadline"
        finally:
            fresh_redis.resume()
        warnings = [r for r in caplog.records if "not answering" in r.getMessage()]
        assert len(warnings) == 1, "one line per outage"
        with caplog.at_level(logging.INFO, "antidistill.server.gateway.nonces"):
            assert await store.claim("during-outage-0123", 30) is False, "Redis back: the local claim still counts"
            assert await store.claim("after-outage-0123", 30) is True
        assert any("answering again" in r.getMessage() for r in caplog.records)
        await store.close()

    run_bounded(scenario())


def test_redis_store_down_from_the_start(tmp_path):
    async def scenario():
        store = RedisNonces("redis://127.0.0.1:1/0", timeout=0.05)
        assert await store.claim("no-redis-nonce-0123", 5) is True
        assert await store.claim("no-redis-nonce-0123", 5) is False
        await store.close()

    run_bounded(scenario())
    assert isinstance(open_nonces(None), MemoryNonces)
    assert isinstance(open_nonces("redis://127.0.0.1:1/0"), RedisNonces)


def test_secret_from_flag_or_environment():
    assert resolve_secret(None, {}) is None
    assert resolve_secret(SECRET, {}) == SECRET
    assert resolve_secret("", {SECRET_ENV: SECRET}) == SECRET, "--trust-gateway alone reads the environment"
    assert resolve_secret(SECRET, {SECRET_ENV: "other" * 10}) == SECRET, "the flag's value wins"
    with pytest.raises(GatewaySecretError, match="needs a secret"):
        resolve_secret("", {})
    with pytest.raises(GatewaySecretError, match="at least 32 characters"):
        resolve_secret("short", {})
    with pytest.raises(GatewaySecretError, match="at least 32 characters"):
        resolve_secret("", {SECRET_ENV: " " + SECRET})
    with pytest.raises(GatewaySecretError, match="--trust-gateway is not"):
        resolve_secret(None, {SECRET_ENV: SECRET})


def test_skew_is_bounded():
    assert check_skew(300) == 300
    for bad in (0, -1, 301, 3600):
        with pytest.raises(GatewaySecretError, match="gateway-max-skew"):
            check_skew(bad)


def test_config_carries_the_secret_to_the_middleware(tmp_path):
    env = {GATEWAY_SKEW_ENV: "1"}
    config = GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin", gateway_secret=SECRET)
    config.export(env)
    back = GatewayConfig.from_env(env)
    assert back.gateway_secret == SECRET and back.gateway_max_skew == DEFAULT_MAX_SKEW
    assert SECRET not in repr(back), "the secret is not printed with the configuration"
    GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin").export(env)
    assert GatewayConfig.from_env(env).gateway_secret is None, "off unless serve turned it on"
    env[SECRET_ENV] = "short"
    with pytest.raises(GatewayConfigError, match="at least 32 characters"):
        GatewayConfig.from_env(env)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("gateway-cli-models"))


def test_serve_refuses_a_secret_that_cannot_work_in_one_line(models, tmp_path, capsys, monkeypatch):
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(yaml.safe_dump({"tiers": {"free": {"lambda": 1}}}))
    good = ["--proxy", str(models.proxy), "--gradient", f"math={models.gradients['math']}", "--tiers", str(tiers)]
    cases = [
        (["--trust-gateway", "short"], None, "at least 32 characters"),
        (["--trust-gateway"], None, f"or set {SECRET_ENV}"),
        ([], SECRET, "is set but --trust-gateway is not"),
        (["--trust-gateway", "--gateway-max-skew", "0"], SECRET, "--gateway-max-skew 0: must be > 0"),
    ]
    for args, env, needle in cases:
        if env is None:
            monkeypatch.delenv(SECRET_ENV, raising=False)
        else:
            monkeypatch.setenv(SECRET_ENV, env)
        code = main(["serve", *good, *args])
        err = capsys.readouterr().err.strip()
        assert code == 1 and needle in err and err.count("\n") == 0, (args, err)
