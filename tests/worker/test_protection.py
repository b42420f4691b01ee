"""Protection (what the adapters call) on tiny models: λ = 0 costs nothing, rows follow batch
moves across profiles, a non-finite Δ never reaches the logits, bad settings stop start-up."""

from __future__ import annotations

import pytest
import torch
from antidistill.benchmarks.tiny.models import save_tiny, train_tokenizer
from antidistill.benchmarks.tiny.serving import build_models
from antidistill.proxy_worker.core.delta import finite_difference
from antidistill.proxy_worker.core.gradient_file import read_delta_scale
from antidistill.proxy_worker.core.plan import build_plan
from antidistill.proxy_worker.runtime.protection import Protection
from antidistill.proxy_worker.runtime.settings import (
    REQUEST_KEYS,
    RequestArgs,
    SettingsError,
    parse_request_args,
    parse_settings,
)
from antidistill.proxy_worker.runtime.vocabulary import VocabularyMismatch
from prometheus_client import REGISTRY


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("protection-models"))


@pytest.fixture()
def protection(models):
    return Protection.from_settings(parse_settings(models.settings(), "test"), teacher_tokenizer=str(models.teacher))


def fallbacks(profile: str) -> float:
    return (
        REGISTRY.get_sample_value("antidistill_delta_fallbacks_total", {"profile": profile, "reason": "non_finite"})
        or 0.0
    )


def fresh(protection, profile, tokens):
    engine = protection.engines[profile]
    return finite_difference(engine.model.logits(build_plan([tokens], [0])), engine.epsilon)[0]


def test_unprotected_rows_cost_nothing(protection):
    protection.add(0, RequestArgs(0.0, "math"), [1, 2, 3], [])
    logits = torch.randn(2, 320)
    before = logits.clone()
    assert protection.apply(logits) is logits
    assert torch.equal(logits, before)
    assert protection.engines["math"].cache.used_tokens == 0


def test_rows_follow_moves_and_swaps_across_profiles(protection):
    protection.add(0, RequestArgs(1.0, "math"), [5, 6, 7], [])
    protection.add(1, RequestArgs(2.0, "code"), [8, 9], [])
    protection.swap(0, 1)
    protection.move(1, 3)  # the math row now sits at 3; row 0 holds the code row
    logits = torch.zeros(4, 330)
    protection.apply(logits)
    assert torch.allclose(logits[0, :320], 2.0 * fresh(protection, "code", [8, 9]), atol=1e-2, rtol=1e-3)
    assert torch.allclose(logits[3, :320], 1.0 * fresh(protection, "math", [5, 6, 7]), atol=1e-2, rtol=1e-3)
    assert torch.equal(logits[1], torch.zeros(330)) and torch.equal(logits[:, 320:], torch.zeros(4, 10))


def test_non_finite_delta_falls_back_to_zero_and_is_counted(protection):
    protection.add(0, RequestArgs(1.0, "math", on_failure="degrade"), [5, 6, 7], [])
    protection.add(1, RequestArgs(1.0, "code"), [5, 6, 7], [])
    protection.engines["math"].model.params["norm"][0, 0] = float("nan")
    logits = torch.zeros(2, 320)
    before = fallbacks("math")
    protection.apply(logits)
    assert torch.equal(logits[0], torch.zeros(320)), "a NaN Δ must never reach the logits"
    assert torch.isfinite(logits[1]).all() and logits[1].abs().max() > 0, "other profiles are unaffected"
    assert fallbacks("math") == before + 1 and fallbacks("code") == 0


def test_permutation_rows_get_the_permuted_signed_delta(protection):
    prompt = [5, 6, 7]
    protection.add(0, RequestArgs(1.5, "math", "permutation"), prompt, [])
    protection.add(1, RequestArgs(1.5, "math", "ad"), prompt, [])
    logits = torch.zeros(2, 320)
    protection.apply(logits)
    delta = fresh(protection, "math", prompt)
    assert torch.allclose(logits[1], 1.5 * delta, atol=1e-2, rtol=1e-3)
    sign = logits[0, 0] / (1.5 * delta[protection.control.permutation[0]])
    assert abs(abs(float(sign)) - 1) < 1e-2
    assert torch.allclose(
        logits[0], float(sign.sign()) * 1.5 * delta[protection.control.permutation], atol=1e-2, rtol=1e-3
    )


def test_the_request_salt_scopes_proxy_prefix_sharing(protection, models):
    """The salt travels from ``vllm_xargs`` (as the adapters parse it) to the proxy cache: the same
    prompt shares proxy KV within a tenant, never across tenants."""
    settings = parse_settings(models.settings(), "test")
    prompt = list(range(5, 45))  # 40 tokens: two full blocks of 16
    for index, salt in enumerate(["ta", "ta", "tb"]):
        args = parse_request_args({"ad_lambda": 1.0, "ad_salt": salt}, settings)
        protection.add(index, args, prompt, [])
        protection.apply(torch.zeros(index + 1, 330))  # one at a time: a row shares what is written
    rows = protection.engines["math"].cache.rows
    assert rows[1].shared == 2 and rows[1].blocks[:2] == rows[0].blocks[:2], "same tenant: shared"
    assert rows[2].shared == 0 and not set(rows[2].blocks) & set(rows[0].blocks), "another tenant: nothing"


def test_request_args_round_trip_through_vllm_xargs(models):
    """``to_xargs`` is the one writer of the worker's arguments: what it writes parses back to the
    same arguments, defaults are left out, and a key it cannot write is one the worker would refuse."""
    settings = parse_settings(models.settings(), "test")
    cases = [
        RequestArgs(0.0, "math"),
        RequestArgs(1.5, "math", "permutation", ticket=7, on_failure="degrade", salt="t" + "a" * 40, tier="free"),
        RequestArgs(2.0, "math", ticket=2**63 - 1),
    ]
    for args in cases:
        assert parse_request_args(args.to_xargs(), settings) == args
    assert RequestArgs(0.0).to_xargs() == {"ad_lambda": 0.0}
    assert set(cases[1].to_xargs()) == set(REQUEST_KEYS)


def test_request_args_validation(models):
    settings = parse_settings(models.settings(allowed_modes=["ad"]), "test")
    assert parse_request_args({"ad_lambda": 2, "other": 1}, settings) == RequestArgs(2.0, "math", "ad")
    assert parse_request_args(None, settings) == RequestArgs(0.0, "math", "ad")
    salted = parse_request_args({"ad_lambda": 1, "ad_salt": "t" + "0" * 127}, settings)
    assert salted.salt == "t" + "0" * 127
    for bad, field in [
        ({"ad_lambda": "2"}, "ad_lambda"),
        ({"ad_lambda": True}, "ad_lambda"),
        ({"ad_lambda": float("inf")}, "ad_lambda"),
        ({"ad_lambda": 21}, "ad_lambda"),
        ({"ad_profile": 3}, "ad_profile"),
        ({"ad_mode": "permutation"}, "ad_mode"),
        ({"ad_seed": 1}, "ad_seed"),
        ({"ad_salt": 7}, "ad_salt"),
        ({"ad_salt": ""}, "ad_salt"),
        ({"ad_salt": "x" * 129}, "ad_salt"),
        ({"ad_salt": ["a"]}, "ad_salt"),
    ]:
        with pytest.raises(ValueError, match=f"vllm_xargs.{field}"):
            parse_request_args(bad, settings)


def test_bad_settings_and_mismatched_proxy_stop_startup(models, tmp_path):
    with pytest.raises(SettingsError, match="epsilon"):
        parse_settings(models.settings(epsilon=0), "test")
    with pytest.raises(SettingsError, match="allowed_modes"):
        parse_settings(models.settings(allowed_modes=["permutation"]), "test")
    other_tok = train_tokenizer(corpus=["zzz yyy xxx www"] * 50)
    teacher = save_tiny(
        tmp_path / "t",
        "llama",
        vocab_size=len(other_tok),
        head_dim=64,
        heads=2,
        kv_heads=1,
        hidden=128,
        tokenizer=other_tok,
    )
    with pytest.raises(VocabularyMismatch, match="token id"):
        Protection.from_settings(parse_settings(models.settings(), "test"), teacher_tokenizer=str(teacher))


def dose_sample(name: str, tier: str, profile: str) -> float:
    metric = {"sum": "antidistill_sampled_delta_sum", "count": "antidistill_sampled_tokens_total"}[name]
    return REGISTRY.get_sample_value(metric, {"tier": tier, "profile": profile}) or 0.0


def test_the_dose_served_is_each_sampled_tokens_delta_over_the_scale(models, protection):
    """Each token a protected row samples is counted once, with the Δ it was served with (the previous
    step's, at that token) over the profile's Δ scale — the last one when the row leaves; rows swapped
    between steps keep their own."""
    scale = read_delta_scale(models.gradients["math"])
    outputs: dict[int, list[int]] = {0: [], 1: []}
    prompts = {0: [5, 6, 7], 1: [8, 9, 10, 11]}
    protection.add(0, RequestArgs(2.0, "math", tier="free"), prompts[0], outputs[0])
    protection.add(1, RequestArgs(2.0, "math", tier="pro"), prompts[1], outputs[1])
    before = {t: (dose_sample("sum", t, "math"), dose_sample("count", t, "math")) for t in ("free", "pro")}
    served = {"free": [], "pro": []}
    tiers = {0: "free", 1: "pro"}

    def last_served() -> None:  # the Δ each row's newest token was sampled with
        for row, tier in tiers.items():
            history = prompts[row] + outputs[row][:-1]
            served[tier].append(float(fresh(protection, "math", history)[outputs[row][-1]]) / scale)

    for step in range(4):
        logits = torch.zeros(2, 320)
        if step:
            last_served()
        protection.apply(logits)
        for row in (0, 1):
            outputs[row].append(int(torch.argmax(logits[row])) % 300 + 5)
        if step == 1:
            protection.swap(0, 1)
            tiers = {0: "pro", 1: "free"}
            outputs = {0: outputs[1], 1: outputs[0]}
            prompts = {0: prompts[1], 1: prompts[0]}
    last_served()
    protection.remove(0)
    protection.remove(1)  # no protected row left: the buffer is observed
    for tier in ("free", "pro"):
        total, count = (dose_sample(n, tier, "math") - b for n, b in zip(("sum", "count"), before[tier], strict=True))
        assert count == len(served[tier]) == 4, (tier, count)
        assert total == pytest.approx(sum(served[tier]), rel=1e-3, abs=1e-4), tier
