"""Over real HTTP: vLLM's own OpenAI server with our processor. Each bad-input class of
``vllm_xargs`` gets a 400 naming the field (completions and chat, streaming and not), and the next
good request still succeeds with the reference sampler's tokens."""

from __future__ import annotations

import json

import httpx
import pytest
from antidistill.benchmarks.launch import free_port, running_server
from antidistill.benchmarks.tiny.reference import ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS, PROCESSOR, build_models, server_flags

from tests.helpers import engine_fixture

BAD_XARGS = [
    ({"ad_lambda": "strong"}, "ad_lambda"),
    ({"ad_lambda": float("nan")}, "ad_lambda"),
    ({"ad_lambda": -1.0}, "ad_lambda"),
    ({"ad_lambda": 1e6}, "ad_lambda"),
    ({"ad_lambda": 1.0, "ad_profile": "poetry"}, "ad_profile"),
    ({"ad_lambda": 1.0, "ad_mode": "reverse"}, "ad_mode"),
    ({"ad_lambda": 1.0, "ad_mode": "permutation"}, "ad_mode"),  # not enabled on this server
    ({"ad_lambda": 1.0, "ad_lamda": 2.0}, "ad_lamda"),
]
IDS = ["type", "nan", "negative", "too-large", "profile", "mode", "mode-not-allowed", "unknown-key"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("http-models"))


@engine_fixture(scope="module")
def server(models, tmp_path_factory):
    port = free_port()
    settings = models.settings(allowed_modes=["ad"])
    args = [
        "-m",
        "vllm.entrypoints.openai.api_server",
        *server_flags(models, port),
        "--logits-processors",
        PROCESSOR,
        "--additional-config",
        json.dumps({"antidistillation": settings}),
    ]
    env = {"ANTIDISTILL_CONFIG": json.dumps({"antidistillation": settings}), "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(args, env, log, port) as base:
        yield base, log


def post(base: str, path: str, body: dict) -> httpx.Response:
    # allow_nan: NaN must reach the server to be rejected there
    return httpx.post(
        f"{base}{path}",
        content=json.dumps(body, allow_nan=True),
        timeout=120,
        headers={"content-type": "application/json"},
    )


def error_of(res: httpx.Response) -> dict:
    """The error object of a rejected request. Plain vLLM rejects a STREAMING completion inside
    the event stream (HTTP 200, first event is the 400 error); a plain request gets HTTP 400."""
    if res.status_code == 400:
        return res.json()["error"]
    assert res.status_code == 200 and res.text.startswith("data: "), res.text
    return json.loads(res.text.splitlines()[0].removeprefix("data: "))["error"]


def completion_body(models, xargs: dict, stream: bool = False) -> dict:
    return {
        "model": str(models.teacher),
        "prompt": "The sum of 12",
        "max_tokens": 8,
        "temperature": 0,
        "stream": stream,
        "vllm_xargs": xargs,
    }


def chat_body(models, xargs: dict, stream: bool = False) -> dict:
    return {
        "model": str(models.teacher),
        "messages": [{"role": "user", "content": "Alice has 3 apples"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": stream,
        "vllm_xargs": xargs,
    }


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("xargs,field", BAD_XARGS, ids=IDS)
def test_bad_xargs_get_400_naming_the_field(server, models, endpoint, stream, xargs, field):
    base, _ = server
    path, make = (
        ("/v1/completions", completion_body) if endpoint == "completions" else ("/v1/chat/completions", chat_body)
    )
    error = error_of(post(base, path, make(models, xargs, stream)))
    assert error["code"] == 400 and field in error["message"], error
    good = post(base, path, make(models, {"ad_lambda": 2.0}, stream))
    assert good.status_code == 200, good.text


def test_good_request_matches_reference_and_engine_survives(server, models):
    base, log = server
    prompt = models.tokenizer("Alice has 3 apples and buys")["input_ids"]
    theta, grad = models.theta_and_grad("code")
    expected = ReferenceSampler(models.teacher, models.proxy, theta, grad, EPSILONS["code"]).generate(prompt, 4.0, 24)
    body = {
        "model": str(models.teacher),
        "prompt": prompt,
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": True,
        "vllm_xargs": {"ad_lambda": 4.0, "ad_profile": "code"},
        "return_token_ids": True,
    }
    res = post(base, "/v1/completions", body)
    assert res.status_code == 200, res.text
    assert res.json()["choices"][0]["token_ids"] == expected
    assert "antidistillation profile 'math'" in log.read_text(), "start-up logs each profile's memory"


def test_streaming_protected_chat(server, models):
    base, _ = server
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=chat_body(models, {"ad_lambda": 3.0}, True), timeout=120
    ) as res:
        assert res.status_code == 200
        chunks = [line for line in res.iter_lines() if line.startswith("data: ")]
    assert chunks[-1] == "data: [DONE]" and len(chunks) > 2
