"""The trusted-gateway verifier on its own: what a signed request must carry to be believed, and the
one-line refusals of a secret that cannot work. (Over HTTP with a real server: test_trusted_gateway_server.py.)"""

from __future__ import annotations

import hashlib
import hmac

import pytest
import yaml
from antidistill.benchmarks.tiny.serving import build_models
from antidistill.server.cli import main
from antidistill.server.config import GATEWAY_SKEW_ENV, GatewayConfig, GatewayConfigError
from antidistill.server.policy import PolicyError
from antidistill.server.tiers import TiersFile, TierTable
from antidistill.server.trusted_gateway import (
    SECRET_ENV,
    GatewaySecretError,
    GatewayVerifier,
    SignedCaller,
    check_skew,
    resolve_secret,
    sign,
    signed_headers,
)

SECRET = "s3cret-" + "x" * 40
PATH = "/v1/chat/completions"
NOW = 1_800_000_000.0
TIERS = TierTable(
    TiersFile.model_validate({"tiers": {"free": {"lambda": 3.0, "max_lambda": 6.0}, "internal": {"lambda": 0.0}}}),
    "test",
)


def scope(headers: dict[str, str] | list[tuple[str, str]], path: str = PATH) -> dict:
    items = headers.items() if isinstance(headers, dict) else headers
    return {"path": path, "headers": [(k.lower().encode(), v.encode()) for k, v in items]}


def verifier(skew: float = 300.0, now: float = NOW) -> GatewayVerifier:
    return GatewayVerifier(SECRET, skew, clock=lambda: now)


def refused(headers, path: str = PATH, v: GatewayVerifier | None = None) -> PolicyError:
    with pytest.raises(PolicyError) as err:
        (v or verifier()).identify(scope(headers, path), TIERS)
    return err.value


def test_canonical_string_is_hmac_sha256_hex_over_five_lines():
    expected = hmac.new(SECRET.encode(), b"v1\nfree\nacme\n1800000000\n/v1/completions", hashlib.sha256).hexdigest()
    assert sign(SECRET, "free", "acme", "1800000000", "/v1/completions") == expected


def test_good_signature_identifies_the_signed_tier_and_account():
    caller = verifier().identify(scope(signed_headers(SECRET, "free", "acme", PATH, NOW)), TIERS)
    assert caller.tier_name == "free" and caller.tier is TIERS.spec.tiers["free"]
    assert caller.key_id == SignedCaller("free", "acme").key_id and caller.account == "acme"
    within = verifier(now=NOW + 299).verify(scope(signed_headers(SECRET, "free", "acme", PATH, NOW)))
    assert within == SignedCaller("free", "acme")
    upper = {**signed_headers(SECRET, "free", "acme", PATH, NOW)}
    upper["X-Antidistill-Signature"] = upper["X-Antidistill-Signature"].upper()
    assert verifier().verify(scope(upper)).account == "acme"


def test_account_id_is_stable_per_account_and_never_a_key_id():
    a, b = SignedCaller("free", "acme"), SignedCaller("internal", "acme")
    assert a.key_id == b.key_id, "one account: one set of limits whatever tier the gateway signs"
    assert a.key_id != SignedCaller("free", "acme2").key_id
    assert a.key_id.startswith("gw-") and len(a.key_id) == 15  # our keys' ids are 12 hex digits


def test_unsigned_and_partly_signed_requests_are_401():
    err = refused({})
    assert err.status == 401 and "unsigned request" in err.message
    partial = signed_headers(SECRET, "free", "acme", PATH, NOW)
    del partial["X-Antidistill-Signature"]
    err = refused(partial)
    assert err.status == 401 and "x-antidistill-signature" in err.message
    err = refused({"Authorization": "Bearer ad-some-key-of-ours"})
    assert err.status == 401, "a bearer key is not a signature in trusted mode"


def test_wrong_secret_and_tampered_fields_are_401():
    other = signed_headers("another-secret-" + "y" * 40, "free", "acme", PATH, NOW)
    assert refused(other).message.startswith("invalid gateway signature")
    good = signed_headers(SECRET, "free", "acme", PATH, NOW)
    for field, value in (
        ("X-Antidistill-Tier", "internal"),  # signed as free, presented as another tier
        ("X-Antidistill-Account", "someone-else"),
        ("X-Antidistill-Timestamp", str(int(NOW) + 1)),
        ("X-Antidistill-Signature", "0" * 64),
        ("X-Antidistill-Signature", "not-hex"),
    ):
        err = refused({**good, field: value})
        assert err.status == 401 and "invalid gateway signature" in err.message, field


def test_signature_is_bound_to_the_path():
    signed_for_completions = signed_headers(SECRET, "free", "acme", "/v1/completions", NOW)
    err = refused(signed_for_completions, PATH)
    assert err.status == 401 and "invalid gateway signature" in err.message
    assert verifier().verify(scope(signed_for_completions, "/v1/completions")).tier == "free"


def test_stale_and_future_timestamps_are_401():
    old = refused(signed_headers(SECRET, "free", "acme", PATH, NOW - 301))
    assert old.status == 401 and "stale gateway signature" in old.message and "301 s old" in old.message
    future = refused(signed_headers(SECRET, "free", "acme", PATH, NOW + 301))
    assert future.status == 401 and "in the future" in future.message
    tight = verifier(skew=5)
    assert refused(signed_headers(SECRET, "free", "acme", PATH, NOW - 6), v=tight).status == 401
    assert tight.verify(scope(signed_headers(SECRET, "free", "acme", PATH, NOW - 5))).tier == "free"


def test_malformed_values_are_401_before_any_hmac():
    good = signed_headers(SECRET, "free", "acme", PATH, NOW)
    for field, value in (
        ("X-Antidistill-Timestamp", "1.8e9"),
        ("X-Antidistill-Timestamp", "-5"),
        ("X-Antidistill-Account", "two words"),
        ("X-Antidistill-Account", "a" * 129),
        ("X-Antidistill-Tier", ""),
    ):
        err = refused({**good, field: value})
        assert err.status == 401 and f"malformed {field.lower()}" in err.message, (field, err.message)


def test_repeated_signing_headers_are_400():
    good = signed_headers(SECRET, "free", "acme", PATH, NOW)
    twice = [*good.items(), ("X-Antidistill-Tier", "internal")]
    err = refused(twice)
    assert err.status == 400 and "2 x-antidistill-tier headers" in err.message
    same_twice = [*good.items(), ("x-antidistill-signature", good["X-Antidistill-Signature"])]
    assert refused(same_twice).status == 400, "even identical copies: exactly one of each"


def test_signed_tier_unknown_to_the_tiers_file_is_401():
    err = refused(signed_headers(SECRET, "platinum", "acme", PATH, NOW))
    assert err.status == 401 and "'platinum' is not defined" in err.message


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
    for bad in (0, -1, 3601):
        with pytest.raises(GatewaySecretError, match="gateway-max-skew"):
            check_skew(bad)


def test_config_carries_the_secret_to_the_middleware(tmp_path):
    env = {GATEWAY_SKEW_ENV: "1"}
    config = GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin", gateway_secret=SECRET)
    config.export(env)
    back = GatewayConfig.from_env(env)
    assert back.gateway_secret == SECRET and back.gateway_max_skew == 300.0
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
