"""Strength requests (ad_strength = λ·s) and the per-tier watermark policy: pure units of policy.py."""

from __future__ import annotations

import pytest
from antidistill.proxy_worker.core.strength import ProfileScales
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.policy import STRENGTH_HEADER, decide, find_smuggled, watermarking
from antidistill.server.tiers import Tier, TiersError, load_tiers

SCALE = 400.0
SCALES = ProfileScales({"math": SCALE, "legacy": None}, default="math")


def strength_tier(**kw) -> Tier:
    """A tier written in strength, as the tiers file gives it: λ [0.0005, 0.00075] at Δ scale 400."""
    return Tier.model_validate({"strength": 0.25, "min_strength": 0.2, "max_strength": 0.3, **kw}, context=SCALES)


def lambda_tier() -> Tier:
    return Tier.model_validate({"lambda": 0.001, "min_lambda": 0.0005, "max_lambda": 0.002})


def refused(*args, **kw) -> Refusal:
    with pytest.raises(Refusal) as err:
        decide(*args, **kw)
    return err.value


def test_a_strength_request_is_lambda_over_the_profiles_scale():
    free = strength_tier()
    assert free.in_strength and not lambda_tier().in_strength
    assert decide("free", free, {"ad_strength": 0.3}, None, scale=SCALE).lam == 0.3 / SCALE
    assert decide("free", free, {}, None, strength_header="0.2", scale=SCALE).lam == 0.2 / SCALE
    assert decide("pro", lambda_tier(), {"ad_strength": 0.6}, None, scale=SCALE).lam == 0.6 / SCALE
    assert decide("pro", lambda_tier(), {"ad_strength": 0.2}, None, scale=200.0).lam == 0.2 / 200.0
    assert decide("free", free, {}, None, scale=SCALE).lam == 0.25 / SCALE, "no request: the tier's own"


def test_range_refusals_name_the_range_in_the_unit_asked_and_the_tiers():
    free = strength_tier()
    err = refused("free", free, {"ad_strength": 0.05}, None, scale=SCALE)
    assert (err.status, err.param) == (403, "ad_strength")
    assert err.message == (
        "ad_strength 0.05 is outside tier 'free''s allowed strength range [0.2, 0.3] (λ [0.0005, 0.00075])"
    )
    err = refused("free", free, {}, None, strength_header="0.4", scale=SCALE)
    assert err.status == 403 and err.message.startswith("ad_strength 0.4 is outside")
    err = refused("free", free, {"ad_lambda": 0}, None, scale=SCALE)
    assert (err.status, err.param) == (403, "ad_lambda")
    assert err.message == "ad_lambda 0 is outside tier 'free''s allowed range [0.0005, 0.00075] (strength [0.2, 0.3])"
    err = refused("pro", lambda_tier(), {"ad_lambda": 0}, None, scale=SCALE)
    assert err.message == "ad_lambda 0 is outside tier 'pro''s allowed range [0.0005, 0.002]", "λ tier: λ only"
    err = refused("pro", lambda_tier(), {"ad_strength": 2.0}, None, scale=SCALE)
    assert err.message == "ad_strength 2 is outside tier 'pro''s allowed strength range [0.2, 0.8] (λ [0.0005, 0.002])"


def test_the_escalation_floor_holds_for_strength_requests():
    free = strength_tier()
    assert decide("free", free, {}, None, 0.001, scale=SCALE).lam == 0.001
    err = refused("free", free, {"ad_strength": 0.3}, None, 0.001, scale=SCALE)
    assert err.status == 403 and "strength range [0.4, 0.4] (λ [0.001, 0.001])" in err.message


@pytest.mark.parametrize("strength_in_xargs", [True, False])
@pytest.mark.parametrize("lambda_in_xargs", [True, False])
def test_a_strength_and_a_lambda_must_be_the_same_request(strength_in_xargs, lambda_in_xargs):
    """Each of the four places the two can be given: agreeing (λ·s = strength) is served at that λ,
    disagreeing is a 400 naming both, never one of them silently ignored."""

    def ask(strength: float, lam: float) -> Refusal | float:
        xargs = {}
        strength_header = lambda_header = None
        if strength_in_xargs:
            xargs["ad_strength"] = strength
        else:
            strength_header = str(strength)
        if lambda_in_xargs:
            xargs["ad_lambda"] = lam
        else:
            lambda_header = str(lam)
        try:
            return decide("free", strength_tier(), xargs, lambda_header, strength_header=strength_header, scale=SCALE)
        except Refusal as err:
            return err

    assert ask(0.3, 0.00075).lam == 0.00075
    assert ask(0.25, 0.000625 * (1 + 1e-12)).lam == 0.000625 * (1 + 1e-12), "agreement within 1e-9 relative"
    for lam in (0.0005, 0.000625 * (1 + 1e-6)):
        err = ask(0.25, lam)
        assert isinstance(err, Refusal) and err.status == 400 and "disagree" in err.message
        strength_where = "vllm_xargs.ad_strength" if strength_in_xargs else STRENGTH_HEADER
        lambda_where = "vllm_xargs.ad_lambda" if lambda_in_xargs else "x-antidistillation-lambda"
        assert strength_where in err.message and lambda_where in err.message


def test_repeated_or_malformed_strengths_are_refused():
    free = strength_tier()
    err = refused("free", free, {"ad_strength": 0.2}, None, strength_header="0.3", scale=SCALE)
    assert err.status == 400 and "vllm_xargs.ad_strength and x-antidistillation-strength disagree" in err.message
    assert decide("free", free, {"ad_strength": 0.2}, None, strength_header="0.2", scale=SCALE).lam == 0.2 / SCALE
    for xargs, header in (({"ad_strength": "x"}, None), ({"ad_strength": True}, None), ({}, "inf"), ({}, "nan")):
        err = refused("free", free, xargs, None, strength_header=header, scale=SCALE)
        assert err.status == 400 and "must be" in err.message


def test_a_strength_on_a_gradient_without_a_scale_asks_for_lambda():
    old = Tier.model_validate({"lambda": 1.0, "max_lambda": 2.0, "profile": "legacy"})
    for xargs, header in (({"ad_strength": 1.0}, None), ({}, "1")):
        err = refused("old", old, xargs, None, strength_header=header, scale=None)
        assert err.status == 400 and "has no Δ scale, request ad_lambda instead" in err.message
        assert "'legacy'" in err.message
    assert decide("old", old, {"ad_lambda": 1.5}, None, scale=None).lam == 1.5, "λ needs no scale"


def test_ad_strength_goes_in_vllm_xargs_only():
    assert find_smuggled({"vllm_xargs": {"ad_strength": 1}}) is None
    assert find_smuggled({"ad_strength": 1}) == "ad_strength"
    assert find_smuggled({"metadata": {"AD_STRENGTH": 1}}) == "metadata.AD_STRENGTH"
    assert find_smuggled({"messages": [{"role": "user", "ad_strength": 1}]}) == "messages[0].ad_strength"
    err = refused("free", strength_tier(), {"ad_strength": 0.2, "ad_profile": "code"}, None, scale=SCALE)
    assert err.status == 403 and "ad_profile" in err.message, "the other ad_* keys stay the server's"


@pytest.mark.parametrize(
    "mode,forwarded",
    [("enforce", (True, True, True)), ("off", (False, False, False)), ("allow", (True, False, None))],
)
def test_the_tier_decides_the_watermarking_field(mode, forwarded):
    """What vLLM is sent for a client that asked True, False, or nothing."""
    tier = Tier.model_validate({"lambda": 0.001, "watermark": mode})
    assert tuple(watermarking(tier, asked) for asked in (True, False, None)) == forwarded


def test_watermark_defaults_to_allow_and_is_validated(tmp_path):
    assert Tier.model_validate({"lambda": 0.001}).watermark == "allow"
    path = tmp_path / "tiers.yaml"
    path.write_text("tiers: {free: {lambda: 0.001, watermark: enforce}}")
    assert load_tiers(path).spec.tiers["free"].watermark == "enforce"
    path.write_text("tiers: {free: {lambda: 0.001, watermark: sometimes}}")
    with pytest.raises(TiersError, match=r"tiers\.free\.watermark"):
        load_tiers(path)


def test_a_strength_at_a_lambda_tiers_bound_is_served_at_the_bound():
    """On a tier written in λ, ``max_lambda·s`` asked as a strength can convert back a rounding step
    above max_lambda; it is served at the bound. Anything really outside is still refused."""
    tier = Tier.model_validate({"lambda": 0.05, "min_lambda": 0.02, "max_lambda": 0.1})
    scale = 3.0
    assert 0.1 * scale / scale > 0.1, "the case: a strength at the ceiling lands above it"
    for bound in (0.02, 0.1):
        assert decide("pro", tier, {"ad_strength": bound * scale}, None, scale=scale).lam == bound
    assert refused("pro", tier, {"ad_strength": 0.1 * scale * 1.001}, None, scale=scale).status == 403
    assert refused("pro", tier, {"ad_lambda": 0.1 * 1.0000001}, None).status == 403, "λ asks are exact"
