"""Abuse resistance and reliability of `antidistill serve` on tiny models (one real server for the module):
logprobs side channels, the route allow-list, protected-request gates, schema fuzzing, client
disconnects, a short soak, and SIGTERM draining (last: it stops the server)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from antidistill.benchmarks.load import sse_lines
from antidistill.benchmarks.soak import kv_tokens_used, soak, wait_kv_idle
from antidistill.benchmarks.tiny.reference import ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS
from antidistill.server.gateway.middleware import EXPOSED

from tests.helpers import Server, chat, completion, engine_fixture, tiny_server

TIERS = {
    "free": {"lambda": 3.0, "max_lambda": 6.0, "max_tokens": 16},
    "scored": {"lambda": 2.0, "max_logprobs": 5, "max_tokens": 16},
    "pro": {"lambda": 1.0, "profile": "code", "max_tokens": 16},
    "internal": {"lambda": 0.0},
}
FUZZ_CASES = 1000


@engine_fixture(scope="module")
def srv(tmp_path_factory) -> Iterator[Server]:
    with tiny_server(tmp_path_factory.mktemp("reliability"), TIERS, profiles=("math", "code")) as server:
        yield server


def post(srv: Server, tier: str | None, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(srv.base + path, json=body, headers=srv.auth(tier), timeout=120, **kw)


def refused(res: httpx.Response, setting: str) -> bool:
    return res.status_code == 403 and setting in res.json()["error"]["message"]


# --- side channels -----------------------------------------------------------------------------


def test_logprobs_are_gated_per_tier(srv):
    """Protected tiers get no logprobs by default; a tier's cap holds however the count is spelled."""
    for body in (completion(srv, logprobs=1), chat(srv, logprobs=True), chat(srv, logprobs=True, top_logprobs=2)):
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        assert refused(post(srv, "free", path, body), "max_logprobs"), body
    over = [
        completion(srv, logprobs=6),
        completion(srv, logprobs=-1),  # -1 = the whole vocabulary
        completion(srv, logprobs=6.0),  # vLLM reads integral floats
        completion(srv, logprobs=6, messages=[], top_logprobs=0),  # a decoy: the route decides the rules
        completion(srv, logprobs=1, logprob_token_ids=list(range(40))),
        chat(srv, logprobs=True, top_logprobs=-1),
        chat(srv, logprobs=True, top_logprobs=1, logprob_token_ids=list(range(6))),
    ]
    for body in over:
        path = "/v1/chat/completions" if body.get("messages") else "/v1/completions"
        assert refused(post(srv, "scored", path, body), "max_logprobs"), body
    for body in (completion(srv, logprobs="20"), completion(srv, logprobs=5.5)):  # vLLM's own model refuses these
        res = post(srv, "scored", "/v1/completions", body)
        assert res.status_code == 400 and res.json()["error"]["param"] == "logprobs", res.text
    for body in (completion(srv, prompt_logprobs=1), completion(srv, echo=True, logprobs=1, max_tokens=1)):
        assert refused(post(srv, "scored", "/v1/completions", body), "allow_prompt_logprobs"), body
    assert refused(post(srv, "scored", "/v1/chat/completions", chat(srv, prompt_logprobs=0)), "allow_prompt_logprobs")
    ok = post(srv, "scored", "/v1/completions", completion(srv, logprobs=5))
    assert ok.status_code == 200 and len(ok.json()["choices"][0]["logprobs"]["top_logprobs"]) == 4
    unprotected = post(srv, "internal", "/v1/completions", completion(srv, prompt_logprobs=2, max_tokens=1))
    assert unprotected.status_code == 200 and unprotected.json()["choices"][0]["prompt_logprobs"]


def test_returned_logprobs_are_the_protected_distribution(srv):
    """Top logprobs equal log_softmax(z_T + λΔ) from an independent HF reference, not the raw teacher's."""
    models, lam, steps = srv.models, TIERS["scored"]["lambda"], 6
    prompt = models.tokenizer("Alice has 3 apples and buys")["input_ids"]
    body = completion(
        srv, prompt=prompt, max_tokens=steps, logprobs=5, ignore_eos=True, return_tokens_as_token_ids=True
    )
    res = post(srv, "scored", "/v1/completions", body)
    assert res.status_code == 200, res.text
    logprobs = res.json()["choices"][0]["logprobs"]
    theta, grad = models.theta_and_grad("math")
    ref = ReferenceSampler(models.teacher, models.proxy, theta, grad, EPSILONS["math"])
    ids = list(prompt)
    worst_protected = worst_raw = 0.0
    for step in range(steps):
        with torch.no_grad():
            z = ref.teacher(torch.tensor([ids])).logits[0, -1].float()
        d = ref.delta(ids)
        protected, raw = z.clone(), torch.log_softmax(z, -1)
        protected[: d.shape[0]] += lam * d
        protected = torch.log_softmax(protected, -1)
        top = {int(k.removeprefix("token_id:")): v for k, v in logprobs["top_logprobs"][step].items()}
        assert len(top) >= 5
        for token, value in top.items():
            worst_protected = max(worst_protected, abs(value - protected[token].item()))
            worst_raw = max(worst_raw, abs(value - raw[token].item()))
        sampled = int(logprobs["tokens"][step].removeprefix("token_id:"))
        assert sampled == int(torch.argmax(protected)), "greedy picks the protected argmax"
        ids.append(sampled)
    # both sides take finite differences at ε = 1e-3 in fp32 (round-off × λ/2ε); raw differs by far more
    assert worst_protected < 1e-2, (worst_protected, worst_raw)
    assert worst_raw > 20 * worst_protected, (worst_protected, worst_raw)


def test_only_allow_listed_routes_answer(srv):
    """Every route the real vLLM app mounted (its start-up log lists them) is 404 unless allow-listed."""
    routes = set(re.findall(r"Route: (\S+), Methods: ([A-Z, ]+)", srv.log.read_text()))
    assert len(routes) > 20, routes
    key = srv.auth("internal")
    hidden = 0
    for path, methods in sorted(routes):
        method = sorted(m.strip() for m in methods.split(","))[0]
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        res = httpx.request(method, srv.base + concrete, headers=key, json={}, timeout=30)
        if path in EXPOSED:
            assert res.status_code != 404, (path, res.status_code)
        else:
            hidden += 1
            assert res.status_code == 404, (path, method, res.status_code, res.text[:200])
    assert {"/tokenize", "/detokenize", "/v1/responses", "/v1/messages", "/invocations"} <= {p for p, _ in routes}
    assert hidden >= 20
    for path in ("/pooling", "/score", "/classify", "/v1/embeddings", "/rerank", "/v1/score", "/openapi.json"):
        assert httpx.post(srv.base + path, headers=key, json={}).status_code == 404, path
    assert httpx.get(srv.base + "/v1/models").status_code == 401
    assert httpx.get(srv.base + "/v1/models", headers=key).status_code == 200


def test_protected_requests_refuse_beam_search_and_embeddings(srv):
    assert refused(post(srv, "free", "/v1/completions", completion(srv, use_beam_search=True, n=2)), "use_beam_search")
    assert refused(post(srv, "free", "/v1/completions", completion(srv, prompt_embeds="AAAA")), "prompt_embeds")
    beam = post(srv, "internal", "/v1/completions", completion(srv, use_beam_search=True, n=2))
    assert beam.status_code == 200, beam.text
    steered = completion(srv, logit_bias={"5": 50}, n=2, max_tokens=3, temperature=1.0)
    res = post(srv, "free", "/v1/completions", steered)
    assert res.status_code == 200 and res.headers["x-antidistillation-lambda"] == "3", res.text
    assert len(res.json()["choices"]) == 2
    only = post(srv, "free", "/v1/completions", completion(srv, allowed_token_ids=[7, 8], max_tokens=3))
    assert only.status_code == 200


def test_per_request_seed_is_refused_on_cpu(srv):
    res = post(srv, "free", "/v1/chat/completions", chat(srv, seed=1))
    assert res.status_code == 400 and "seed" in res.json()["error"]["message"]


# --- fuzzing -----------------------------------------------------------------------------------


def fuzz_schema() -> dict:
    """vLLM's published OpenAPI schema (built from its real app, no engine), cut to the two routes."""
    from antidistill.server.startup.vllm_cli import make_arg_parser
    from vllm.entrypoints.launchers.app import build_app
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
    raw = build_app(args, ("generate",), None).openapi()
    raw["paths"] = {p: raw["paths"][p] for p in ("/v1/completions", "/v1/chat/completions")}
    return raw


def check_response(res: httpx.Response, text: str) -> str | None:
    """None if the response is a well-formed success or 4xx; else what is wrong."""
    if res.status_code >= 500:
        return f"HTTP {res.status_code}: {text[:300]}"
    if res.status_code == 200 and res.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]  # SSE: LF only
        if not events or events[-1] != "[DONE]":
            return f"stream without [DONE]: {text[-300:]}"
        for event in events[:-1]:
            data = json.loads(event)
            if "error" in data and int(data["error"].get("code") or 0) >= 500:
                return f"error event {event[:300]}"
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return f"HTTP {res.status_code} body is not JSON: {text[:300]}"
    if res.status_code == 200 and "choices" not in data:
        return f"200 without choices: {text[:300]}"
    if res.status_code >= 400 and not ("error" in data or "detail" in data):
        return f"HTTP {res.status_code} without an error object: {text[:300]}"
    return None


@pytest.mark.slow
def test_fuzz_generate_routes(srv):
    """Schema-generated bodies (valid and invalid) with random vllm_xargs, λ headers and keys: no 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(fuzz_schema())
    ops = {path: schema[path]["POST"] for path in ("/v1/completions", "/v1/chat/completions")}
    bases = {"/v1/completions": completion(srv), "/v1/chat/completions": chat(srv)}
    strategies = {
        (path, mode): op.as_strategy(generation_mode=mode)
        for path, op in ops.items()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    }
    json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
    xargs = st.one_of(
        st.none(),
        st.dictionaries(st.sampled_from(["ad_lambda", "ad_profile", "ad_mode", "x", "ad_"]), json_scalar, max_size=3),
        st.lists(json_scalar, max_size=2),
        json_scalar,
    )
    auth = st.sampled_from([*(f"Bearer {k}" for k in srv.keys.values()), "Bearer ad-nope", "Basic x", "", None])
    lam_header = st.one_of(st.none(), st.sampled_from(["0", "3", "-1", "nan", "1e309", "x", ""]))
    failures: list[str] = []
    seen = {"cases": 0, "statuses": {}}
    client = httpx.Client(base_url=srv.base, timeout=120)

    @settings(
        max_examples=FUZZ_CASES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def case(data) -> None:
        path = data.draw(st.sampled_from(sorted(ops)))
        mode = data.draw(st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]))
        generated = data.draw(strategies[(path, mode)])
        body = generated.body
        if isinstance(body, dict) and data.draw(st.booleans()):
            body = {**body, **bases[path]}  # a servable request carrying the fuzzed fields
            body.pop("seed", None) if data.draw(st.booleans()) else None
        if isinstance(body, dict) and data.draw(st.booleans()):
            body = {**body, "vllm_xargs": data.draw(xargs)}
        headers = {"content-type": "application/json"}
        if (value := data.draw(auth)) is not None:
            headers["authorization"] = value
        if (value := data.draw(lam_header)) is not None:
            headers["x-antidistillation-lambda"] = value
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        res = client.post(path, content=content, headers=headers)
        seen["cases"] += 1
        seen["statuses"][res.status_code] = seen["statuses"].get(res.status_code, 0) + 1
        problem = check_response(res, res.text)
        if problem:
            failures.append(f"{path} {content[:300]!r}: {problem}")

    start = time.monotonic()
    case()
    elapsed = time.monotonic() - start
    client.close()
    print(f"fuzzed {seen['cases']} cases in {elapsed:.0f} s: statuses {seen['statuses']}")
    assert seen["cases"] >= FUZZ_CASES
    assert not failures, "\n".join(failures[:20])
    assert seen["statuses"].get(200, 0) >= 50, seen  # a fair share reached the engine
    after = post(srv, "free", "/v1/completions", completion(srv))
    assert after.status_code == 200 and after.json()["choices"][0]["text"] is not None


def test_hostile_bodies_and_headers_are_4xx(srv):
    """Hostile inputs; the first two (recursion, header decoding) and the last (vLLM's structured_outputs
    validator, found by the fuzzer) were 500s."""
    key = srv.keys["free"]
    prompt = b'{"model": "%s", "prompt": "x", "max_tokens": 2' % srv.model.encode()
    cases = [
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}),
        (prompt + b', "user": ' + b'{"a":' * 900 + b"1" + b"}" * 900 + b"}", {}),
        (prompt + b"}", {"x-client": b"\xff\xfe obs-text"}),
        (prompt + b', "n": 99999999999999999999999999999}', {}),
        (prompt.replace(b"2", b"1e400") + b"}", {}),
        (prompt + b', "vllm_xargs": {"ad_lambda": NaN}}', {}),
        (prompt + b', "stream": true, "stream_options": [1]}', {}),
        (b"\xff\xfe", {}),
        (prompt + b', "structured_outputs": [1]}', {}),  # found by the fuzzer: a 500 inside vLLM
    ]
    for body, extra in cases:
        headers = {"authorization": f"Bearer {key}", "content-type": "application/json", **extra}
        res = httpx.post(srv.base + "/v1/completions", content=body, headers=headers, timeout=60)
        assert res.status_code < 500 and check_response(res, res.text) is None, (body[:80], res.status_code, res.text)
    assert post(srv, "free", "/v1/completions", completion(srv)).status_code == 200


# --- faults and load ---------------------------------------------------------------------------


def test_client_disconnects_leak_no_proxy_slots(srv):
    """100 protected streams cut after their first chunk: the proxy KV gauge returns to 0."""
    body = completion(srv, max_tokens=16, ignore_eos=True, stream=True, temperature=1.0)
    headers = srv.auth("free")
    seen_in_use: list[float] = []

    async def one(client: httpx.AsyncClient, check: bool) -> bool:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as res:
            async for line in sse_lines(res):
                if line.startswith("data: {"):
                    if check:
                        seen_in_use.append(await asyncio.to_thread(kv_tokens_used, srv.base, srv.metrics_key))
                    return True
        return False

    async def run() -> list[bool]:
        out = []
        async with httpx.AsyncClient(base_url=srv.base, timeout=120) as client:
            for batch in range(5):
                out += await asyncio.gather(*(one(client, batch == 0 and i == 0) for i in range(20)))
        return out

    started = asyncio.run(run())
    assert sum(started) == 100
    assert seen_in_use and seen_in_use[0] > 0, "the gauge counts rows in use"
    used, waited = wait_kv_idle(srv.base, srv.metrics_key)
    assert used == 0, f"proxy KV still holds {used} tokens {waited:.0f} s after 100 disconnects"
    assert post(srv, "free", "/v1/completions", completion(srv)).status_code == 200


@pytest.mark.slow
def test_short_soak(srv):
    """≈2 minutes of mixed-tier streaming: 0 errors, bounded RSS growth, proxy KV back to 0."""
    keys = {tier: srv.keys[tier] for tier in ("free", "pro", "internal")}
    result = soak(
        srv.base,
        srv.model,
        keys,
        srv.process.pid,
        seconds=120,
        concurrency=8,
        max_tokens=16,
        metrics_key=srv.metrics_key,
    )
    summary = {k: v for k, v in result.items() if k != "series"}
    print(json.dumps(summary, indent=1))
    assert result["errors"] == 0 and result["ok"] > 100, summary
    assert result["proxy_kv_tokens_used_after_idle"] == 0, summary
    for which, rss in result["rss"].items():
        assert rss["growth_mib"] <= result["rss_bound_mib"], (which, rss)
    assert result["passed"]


def test_sigterm_drains_then_exits_zero(srv):
    """In-flight streams finish, new requests get 503, the process exits 0. Stops the server."""
    body = completion(srv, max_tokens=200, ignore_eos=True, stream=True)
    headers = srv.auth("internal")
    chunks: list[str] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", srv.base + "/v1/completions", json=body, headers=headers, timeout=120) as res:
            pending = ""
            for text in res.iter_text():  # SSE lines end at LF only (iter_lines also splits on U+2028)
                *lines, pending = (pending + text).split("\n")
                chunks.extend(line for line in lines if line.startswith("data: "))
                first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    srv.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10  # the stream lasts ~1 s or more: ask as soon as the drain began
    while httpx.get(srv.base + "/health").status_code != 503:
        assert time.monotonic() < deadline, "orchestrators stop routing here: /health must answer 503"
        time.sleep(0.02)
    late = post(srv, "internal", "/v1/completions", completion(srv))
    assert late.status_code == 503 and late.headers.get("retry-after"), late.text
    reader.join(120)
    finishes = [json.loads(c[6:])["choices"][0].get("finish_reason") for c in chunks if c.startswith("data: {")]
    assert chunks[-1] == "data: [DONE]" and "length" in finishes, chunks[-3:]
    tokens = sum(1 for c in chunks if c.startswith('data: {"id"'))
    assert tokens >= 150, f"the in-flight stream was cut after {tokens} chunks"
    assert srv.process.wait(timeout=120) == 0
    log = srv.log.read_text()
    assert "SIGTERM: draining 1 in-flight requests" in log and "drained; shutting down" in log
