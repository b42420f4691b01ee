"""Tiers file validation and the λ policy (pure units; the server test covers HTTP; limits: test_shared_limits)."""

from __future__ import annotations

import pytest
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.policy import decide, find_smuggled
from antidistill.server.tiers import SideChannels, Tier, TiersError, hash_key, load_tiers, new_key


def tier(**kw) -> Tier:
    return Tier.model_validate({"lambda": 2.0, **kw})


def write(tmp_path, text: str):
    path = tmp_path / "tiers.yaml"
    path.write_text(text)
    return path


def test_tiers_file_errors_name_the_field(tmp_path):
    cases = [
        ("tiers: {free: {lambda: -1}}", "tiers.free.lambda"),
        ("tiers: {free: {lambda: 1, max_lambda: 0.5}}", "min_lambda ≤ lambda ≤ max_lambda"),
        ("tiers: {free: {lambda: 1, colour: red}}", "tiers.free.colour"),
        ("tiers: {free: {lambda: 1}}\nkeys: [{sha256: abc, tier: free}]", "keys.0.sha256"),
        (f"tiers: {{free: {{lambda: 1}}}}\nkeys: [{{sha256: {'a' * 64}, tier: gold}}]", "unknown tier 'gold'"),
        ("tiers: [", "invalid YAML"),
    ]
    for text, needle in cases:
        with pytest.raises(TiersError, match=needle.replace("(", r"\(")):
            load_tiers(write(tmp_path, text))
    with pytest.raises(TiersError, match="cannot read"):
        load_tiers(tmp_path / "absent.yaml")


def test_keys_are_hashed_and_revocable(tmp_path):
    key, digest = new_key()
    other, other_digest = new_key()
    assert digest == hash_key(key) and key not in digest
    table = load_tiers(
        write(
            tmp_path,
            f"tiers: {{pro: {{lambda: 1}}}}\nkeys:\n - {{sha256: {digest}, tier: pro}}\n"
            f" - {{sha256: {other_digest}, tier: pro, revoked: true}}\n",
        )
    )
    caller = table.identify(key)
    assert caller.tier_name == "pro" and caller.key_id == digest[:12]
    assert table.identify(other) is None and table.identify("nope") is None
    assert table.identify(None) is None, "no anonymous tier → no key is refused"
    anon = load_tiers(write(tmp_path, "tiers: {anonymous: {lambda: 4}}"))
    assert anon.identify(None).tier.lambda_ == 4


def test_defaults_close_side_channels_for_protected_tiers():
    assert tier().side_channels(tier().lambda_, escalated=False) == SideChannels(0, False)
    clean = Tier.model_validate({"lambda": 0, "max_lambda": 2})
    assert clean.side_channels(0, escalated=False) == SideChannels(20, True)
    assert clean.side_channels(1.0, escalated=False) == SideChannels(0, False), "defaults follow the decided λ"
    scored = Tier.model_validate({"lambda": 0, "max_logprobs": 5, "allow_prompt_logprobs": True})
    assert scored.side_channels(0, escalated=False) == SideChannels(5, True), "the operator's explicit values"
    assert scored.side_channels(0, escalated=True) == SideChannels(0, False), "an escalated key gets none"


def test_policy_floor_range_and_defaults():
    t = tier(min_lambda=1.0, max_lambda=3.0)
    assert decide("free", t, {}, None).lam == 2.0
    assert decide("free", t, {"ad_lambda": 1.5}, None).lam == 1.5
    assert decide("free", t, {}, "2.5").lam == 2.5
    for xargs, header in (({"ad_lambda": 0}, None), ({}, "0"), ({"ad_lambda": 3.5}, None)):
        with pytest.raises(Refusal) as err:
            decide("free", t, xargs, header)
        assert err.value.status == 403 and "[1, 3]" in err.value.message
    for bad in ({"ad_lambda": "x"}, {"ad_lambda": float("nan")}, {"ad_lambda": True}):
        with pytest.raises(Refusal) as err:
            decide("free", t, bad, None)
        assert err.value.status == 400
    with pytest.raises(Refusal, match="ad_profile"):
        decide("free", t, {"ad_profile": "code"}, None)
    with pytest.raises(Refusal, match="disagree"):
        decide("free", t, {"ad_lambda": 1.5}, "2")


def test_escalation_raises_floor():
    t = tier(min_lambda=1.0, max_lambda=3.0)
    assert decide("free", t, {}, None, escalated=5.0).lam == 5.0
    with pytest.raises(Refusal, match=r"\[5, 5\]"):
        decide("free", t, {"ad_lambda": 2.0}, None, escalated=5.0)


def test_smuggling_anywhere_but_vllm_xargs():
    assert find_smuggled({"vllm_xargs": {"ad_lambda": 0}, "prompt": "x"}) is None
    assert find_smuggled({"ad_lambda": 0}) == "ad_lambda"
    assert find_smuggled({"metadata": {"AD_LAMBDA": 0}}) == "metadata.AD_LAMBDA"
    assert find_smuggled({"messages": [{"role": "user", "content": "x", "ad_mode": "x"}]}) == "messages[0].ad_mode"
