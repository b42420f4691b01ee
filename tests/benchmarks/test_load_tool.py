"""The load generator's bookkeeping against a small fake OpenAI endpoint (the real server is
exercised by the benchmarks and the soak)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from antidistill.benchmarks.load import LoadConfig, is_loopback, percentiles, run_load, summarize


def fake_openai(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if request.headers.get("authorization") != "Bearer good":
        return httpx.Response(401, json={"error": {"message": "missing API key"}})
    n = body["max_tokens"]
    if not body["stream"]:
        return httpx.Response(
            200, json={"choices": [{"message": {"content": "x" * n}}], "usage": {"completion_tokens": n}}
        )
    # U+2028 and U+0085 are legal raw inside JSON strings (pydantic leaves them so); SSE lines end at LF only
    events = [{"choices": [{"delta": {"content": "x\u2028\x85"}}]} for _ in range(n)]
    events.append({"choices": [], "usage": {"completion_tokens": n}})
    text = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def config(stream: bool, keys: dict) -> LoadConfig:
    return LoadConfig("http://127.0.0.1:1", "m", keys, dict.fromkeys(keys, 1.0), 4, 20, 60, 5, stream, {})


def test_counts_tokens_latencies_and_errors():
    transport = httpx.MockTransport(fake_openai)
    for stream in (True, False):
        samples, elapsed = asyncio.run(run_load(config(stream, {"a": "good", "b": "bad"}), transport=transport))
        summary = summarize(samples, elapsed)
        assert summary["requests"] == 20 and summary["ok"] + summary["errors_by_status"].get("401", 0) == 20
        assert summary["output_tokens"] == 5 * summary["ok"] and summary["ok"] > 0
        assert summary["e2e_s"]["p50"] is not None
        if stream:
            assert summary["ttft_s"]["p50"] is not None and summary["itl_s"]["p99"] is not None
    assert set(summary["by_tier"]) <= {"a", "b"}


def test_loopback_only_and_percentiles():
    assert is_loopback("http://127.0.0.1:8000") and is_loopback("http://localhost:1") and is_loopback("http://[::1]:8")
    assert not is_loopback("http://10.0.0.5:8000") and not is_loopback("http://example.com")
    p = percentiles([float(i) for i in range(1, 101)])
    assert round(p["p50"]) == 50 and round(p["p99"]) == 99


def test_each_prompt_is_sent_with_its_own_budget():
    """The mixed workload: request i sends prompt i with budget i (cycling), so a run's token count is
    the budgets' sum per pass over the pool; budgets that do not pair with the prompts are refused."""
    cfg = config(False, {"a": "good"})
    cfg.prompts, cfg.budgets, cfg.requests = ["p", "q", "r"], [3, 7, 11], 6
    samples, _ = asyncio.run(run_load(cfg, transport=httpx.MockTransport(fake_openai)))
    assert sorted(s.output_tokens for s in samples) == [3, 3, 7, 7, 11, 11]
    cfg.budgets = [3, 7]
    with pytest.raises(ValueError, match="2 budgets for 3 prompts"):
        asyncio.run(run_load(cfg, transport=httpx.MockTransport(fake_openai)))
