"""Two real `antidistill serve` processes (vLLM CPU engine, tiny models) sharing one real
redis-server through ``--state``: one policy however requests are spread. Limits and leases hold
across both; escalation counts volume from both processes and both keys of an account (judged by the
output tokens against the reference sampler); a replica killed mid-request frees its slot when its
lease expires; with Redis stopped under load nothing fails, protected λ holds, the fallback metric
rises, and shared state resumes when Redis returns. The tests run in order on one pair of servers."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from antidistill.benchmarks.launch import free_port, server_process
from antidistill.benchmarks.tiny.reference import ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS, antidistill_serve_args, build_models
from antidistill.server.tiers import new_key

from tests.helpers import Server, engine_fixture, metrics_key_args, scrape, total
from tests.redis_server import RedisServer

ESCALATION = {"tokens_per_hour": 20, "lambda": 4.0}
TIERS = {
    "limited": {"lambda": 1.0, "rpm": 3},
    "single": {"lambda": 1.0, "max_concurrent": 1},
    "watched": {"lambda": 0.5, "max_lambda": 1.0, "escalation": ESCALATION},
    "member": {"lambda": 0.5, "max_lambda": 1.0},
    "guarded": {"lambda": 3.0, "min_lambda": 3.0},
}
KEYS = {  # key name → (tier, account)
    "limited": ("limited", None),
    "limited-after": ("limited", None),
    "single": ("single", None),
    "single-killed": ("single", None),
    "watched": ("watched", None),
    "dropper": ("watched", None),
    "acme-1": ("member", "acme"),
    "acme-2": ("member", "acme"),
    "guarded": ("guarded", None),
}
LEASE_SECONDS = 3
COMPLETIONS = "/v1/completions"


@dataclass
class Pair:
    a: Server
    b: Server
    redis: RedisServer


def write_tiers(path: Path) -> dict[str, str]:
    keys, entries = {}, []
    for name, (tier, account) in KEYS.items():
        keys[name], digest = new_key()
        entries.append({"sha256": digest, "tier": tier, "name": name, **({"account": account} if account else {})})
    spec = {"tiers": TIERS, "keys": entries, "accounts": {"acme": {"escalation": ESCALATION}}}
    path.write_text(yaml.safe_dump(spec))
    return keys


@engine_fixture(scope="module")
def pair(tmp_path_factory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("shared-state")
    redis = RedisServer(root)
    redis.start()
    models = build_models(root)
    tiers = root / "tiers.yaml"
    keys = write_tiers(tiers)
    metrics_key, metrics_args = metrics_key_args(root)  # one key for both replicas, as one Prometheus job
    # a generous Redis timeout: exact cross-process counts must not depend on how busy this machine is
    state = ["--state", redis.url, "--state-lease-seconds", str(LEASE_SECONDS), "--state-timeout", "2"]

    def start(name: str, stack: ExitStack) -> Server:
        port, audit, log = free_port(), root / f"audit-{name}.jsonl", root / f"server-{name}.log"
        args = [*antidistill_serve_args(models, tiers, audit, port), *state, *metrics_args]
        base, proc = stack.enter_context(server_process(args, {"VLLM_CPU_KVCACHE_SPACE": "1"}, log, port))
        return Server(base, port, keys, models, tiers, audit, log, proc, metrics_key)

    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        stack.callback(redis.stop)
        a, b = pool.map(lambda name: start(name, stack), ("a", "b"))  # both engines start at once
        yield Pair(a, b, redis)


@pytest.fixture(scope="module")
def reference(pair: Pair) -> ReferenceSampler:
    theta, grad = pair.a.models.theta_and_grad("math")
    return ReferenceSampler(pair.a.models.teacher, pair.a.models.proxy, theta, grad, EPSILONS["math"])


def prompt_ids(srv: Server, text: str = "Alice has 3 apples and buys") -> list[int]:
    return srv.models.tokenizer(text)["input_ids"]


def body(srv: Server, max_tokens: int = 2, **fields) -> dict:
    return {
        "model": srv.model,
        "prompt": prompt_ids(srv),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        **fields,
    }


def post(srv: Server, key: str, max_tokens: int = 2) -> httpx.Response:
    return httpx.post(srv.base + COMPLETIONS, json=body(srv, max_tokens), headers=srv.auth(key), timeout=120)


def served(res: httpx.Response) -> tuple[float, list[int]]:
    """(λ the response says was applied, the output tokens)."""
    assert res.status_code == 200, res.text
    return float(res.headers["x-antidistillation-lambda"]), res.json()["choices"][0]["token_ids"]


def refused(res: httpx.Response, needle: str) -> None:
    assert res.status_code == 429 and needle in res.json()["error"]["message"], res.text
    assert int(res.headers["retry-after"]) >= 1


def eventually(call, what: str, seconds: float = 15) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        res = call()
        if res.status_code == 200:
            return res
        time.sleep(0.25)
    pytest.fail(what)


def test_rpm_is_enforced_across_both_processes(pair):
    for srv in (pair.a, pair.b, pair.a):
        served(post(srv, "limited"))
    for srv in (pair.b, pair.a):  # the 4th request of the minute is refused whichever process it hits
        refused(post(srv, "limited"), "more than 3 requests per minute")


def test_max_concurrent_is_enforced_across_both_processes(pair):
    payload = body(pair.a, 60, stream=True)
    with httpx.stream("POST", pair.a.base + COMPLETIONS, json=payload, headers=pair.a.auth("single"), timeout=120) as s:
        assert s.status_code == 200
        lines = s.iter_lines()  # one iterator: dropping one would close the stream
        next(lines)
        refused(post(pair.b, "single"), "more than 1 concurrent requests")
        for _ in lines:
            pass
    eventually(lambda: post(pair.b, "single"), "the slot was never released across processes")


def test_escalation_counts_both_processes_and_both_keys_of_an_account(pair, reference):
    prompt = prompt_ids(pair.a)
    low, high = reference.generate(prompt, 0.5, 8), reference.generate(prompt, 4.0, 8)
    assert low != high, "the check needs λ 0.5 and λ 4 to differ on this prompt"
    for first, second, third in (
        (("watched", pair.a), ("watched", pair.b), ("watched", pair.a)),  # one key, two processes
        (("acme-1", pair.a), ("acme-2", pair.b), ("acme-1", pair.b)),  # two keys of one account
    ):
        for key, srv in (first, second):  # 12 + 12 output tokens: over 20 only together
            lam, tokens = served(post(srv, key, 12))
            assert lam == 0.5 and len(tokens) == 12
        key, srv = third
        lam, tokens = served(post(srv, key, 8))
        assert lam == 4.0 and tokens == high, f"{key} escalated by volume it and its peers sent elsewhere"
    lam, tokens = served(post(pair.a, "acme-2", 8))  # now known to both processes
    assert lam == 4.0 and tokens == high
    audit = pair.b.audit.read_text().splitlines()[-2:]
    assert any('"escalated": true' in line for line in audit)


def test_streams_dropped_on_one_process_escalate_the_key_on_the_other(pair, reference):
    """A harvester closes each stream before its usage event: what it was sent still counts, in the
    shared window, so its next request on the other process is served at the escalated λ."""
    payload = body(pair.a, 48, stream=True)
    for _ in range(2):  # 2 × ≥ 12 tokens read > 20 per hour
        with httpx.stream(
            "POST", pair.a.base + COMPLETIONS, json=payload, headers=pair.a.auth("dropper"), timeout=120
        ) as s:
            assert s.status_code == 200
            read = 0
            for line in s.iter_lines():
                read += line.startswith("data: {")
                if read == 12:
                    break
    lam, tokens = served(post(pair.b, "dropper", 8))
    assert lam == 4.0 and tokens == reference.generate(prompt_ids(pair.b), 4.0, 8)


def test_redis_stopped_under_load_keeps_lambda_and_recovers(pair, reference):
    prompt = prompt_ids(pair.a)
    protected, escalated = reference.generate(prompt, 3.0, 8), reference.generate(prompt, 4.0, 8)
    before = {
        s.base: total(scrape(s.base, s.metrics_key), "antidistill_state_fallbacks_total") for s in (pair.a, pair.b)
    }
    logged = {s.base: len(s.log.read_text()) for s in (pair.a, pair.b)}  # this outage's lines only

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(srv: Server, key: str) -> httpx.Response:
                return await client.post(srv.base + COMPLETIONS, json=body(srv, 8), headers=srv.auth(key))

            def wave() -> list:
                jobs = [(srv, "guarded") for srv in (pair.a, pair.b) for _ in range(3)]
                jobs += [(pair.a, "acme-1"), (pair.b, "acme-2")]
                return [asyncio.ensure_future(one(srv, key)) for srv, key in jobs]

            first = wave()
            await asyncio.sleep(0.2)
            await asyncio.to_thread(pair.redis.stop)  # Redis goes away while the first wave runs
            second = wave()
            await asyncio.sleep(1.5)  # past the retry backoff: Redis is asked again, and is still gone
            third = wave()
            return list(await asyncio.gather(*first, *second, *third))

    results = asyncio.run(load())
    assert [r.status_code for r in results] == [200] * len(results), [r.text for r in results if r.status_code != 200]
    for res in results:
        lam, tokens = served(res)
        key = res.request.headers["authorization"]
        want = (3.0, protected) if key == pair.a.auth("guarded")["Authorization"] else (4.0, escalated)
        assert (lam, tokens) == want, "an outage never lowers λ: not the floor, not a known escalation"
    for srv in (pair.a, pair.b):
        samples = scrape(srv.base, srv.metrics_key)
        assert total(samples, "antidistill_state_fallbacks_total") > before[srv.base]
        assert total(samples, "antidistill_state_mode", mode="local") == 1
        assert srv.log.read_text()[logged[srv.base] :].count("not answering") == 1, "one log line per outage"

    pair.redis.start()  # empty, on the same port
    time.sleep(1.5)
    for srv in (pair.a, pair.b, pair.a):
        served(post(srv, "limited-after"))
    refused(post(pair.b, "limited-after"), "more than 3 requests per minute")  # shared again
    for srv in (pair.a, pair.b):
        assert total(scrape(srv.base, srv.metrics_key), "antidistill_state_mode", mode="redis") == 1
        assert "answering again" in srv.log.read_text()


def test_a_killed_replica_does_not_keep_its_slot(pair):
    b = pair.b
    payload = body(b, 200, stream=True)
    with httpx.stream("POST", b.base + COMPLETIONS, json=payload, headers=b.auth("single-killed"), timeout=120) as s:
        assert s.status_code == 200
        lines = s.iter_lines()
        next(lines)
        doomed = psutil.Process(b.process.pid)
        children = doomed.children(recursive=True)
        doomed.send_signal(signal.SIGKILL)  # no release, no more renewals
        for child in children:
            child.kill()
        killed = time.monotonic()
    refused(post(pair.a, "single-killed"), "more than 1 concurrent requests")  # its lease still holds
    eventually(lambda: post(pair.a, "single-killed"), "the dead replica's slot was never freed", 3 * LEASE_SECONDS)
    assert time.monotonic() - killed <= 2 * LEASE_SECONDS + 2
