"""The shared limit state against a real redis-server (no engine): the Lua scripts' semantics with
two states standing for two replicas, leases that expire, and what happens while Redis is down or
frozen. Clocks are pinned where windows are exact; lease renewal and timeouts run in real time."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from antidistill.server.gateway.config import (
    LEASE_ENV,
    STATE_TIMEOUT_ENV,
    GatewayConfig,
    GatewayConfigError,
    check_state_url,
)
from antidistill.server.gateway.errors import Refusal
from antidistill.server.gateway.limits.memory import MemoryState, Scope
from antidistill.server.gateway.limits.redis_state import RedisState
from antidistill.server.tiers import Escalation
from prometheus_client import REGISTRY

from tests.redis_server import RedisServer

ESC = Escalation.model_validate({"tokens_per_hour": 100, "lambda": 4, "decay_minutes": 10})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh(server):
    if server.proc is None:
        server.start()
    server.client().flushall()
    return server


def run(coro):
    """Each scenario is bounded: a call that waits on Redis unboundedly fails here with the await
    chain it was stuck in, instead of hanging the suite."""
    return asyncio.run(asyncio.wait_for(coro, 30))


def key(name: str, **limits) -> Scope:
    return Scope(f"key:{name}", "", **limits)


def account(name: str, **limits) -> Scope:
    return Scope(f"account:{name}", f"account {name!r}: ", **limits)


def fallbacks(reason: str) -> float:
    return REGISTRY.get_sample_value("antidistill_state_fallbacks_total", {"reason": reason}) or 0.0


def test_windows_are_shared_by_two_replicas(fresh):
    now = [1000.0]

    async def body():
        a = RedisState(fresh.url, clock=lambda: now[0])
        b = RedisState(fresh.url, clock=lambda: now[0])
        k = (key("k", rpm=3, tpm=100),)
        await a.admit(k, 10)
        await b.admit(k, 10)
        now[0] += 30
        await a.admit(k, 10)
        with pytest.raises(Refusal) as err:
            await b.admit(k, 10)
        assert err.value.status == 429 and "3 requests per minute" in err.value.message
        assert err.value.retry_after == 30  # the first request leaves the window at 1060 s
        now[0] = 1060.0
        grant = await b.admit(k, 60)  # the two at 1000 s left the minute; 10 + 60 tokens ≤ 100
        with pytest.raises(Refusal, match=r"tokens per minute \(70 used, 31 asked\)"):
            await a.admit((key("k", tpm=100),), 31)
        await b.release(grant.lease, 0, refund=True)  # refused later by the policy: uncounted
        await a.admit((key("k", tpm=100),), 31)
        await a.close()
        await b.close()

    run(body())


def test_concurrency_leases_are_shared_and_released(fresh):
    async def body():
        a, b = RedisState(fresh.url), RedisState(fresh.url)
        one = (key("c", max_concurrent=1),)
        grant = await a.admit(one, 1)
        with pytest.raises(Refusal, match="more than 1 concurrent requests"):
            await b.admit(one, 1)
        await a.release(grant.lease, 5)
        assert (await b.admit(one, 1)).lease.shared
        await a.close()
        await b.close()

    run(body())


def test_account_limits_span_its_keys(fresh):
    async def body():
        a, b = RedisState(fresh.url), RedisState(fresh.url)
        acme = account("acme", rpm=2)
        await a.admit((key("k1", rpm=10), acme), 1)
        await b.admit((key("k2", rpm=10), acme), 1)
        with pytest.raises(Refusal, match="account 'acme': more than 2 requests per minute"):
            await a.admit((key("k3", rpm=10), acme), 1)
        await a.admit((key("k3", rpm=10),), 1)  # the same key without the account is not limited
        await a.close()
        await b.close()

    run(body())


def test_escalation_by_volume_over_replicas_and_keys(fresh):
    now = [5000.0]

    async def body():
        a = RedisState(fresh.url, clock=lambda: now[0])
        b = RedisState(fresh.url, clock=lambda: now[0])
        acme = account("acme", escalation=ESC)
        g1 = await a.admit((key("k1"), acme), 1)
        g2 = await b.admit((key("k2"), acme), 1)
        assert g1.escalated is None and g2.escalated is None
        await a.release(g1.lease, 60)  # 60 + 60 output tokens > 100 per hour, over two keys and replicas
        await b.release(g2.lease, 60)
        assert (await a.admit((key("k3"), acme), 1)).escalated == 4
        assert (await b.admit((key("k1"), acme), 1)).escalated == 4
        assert (await b.admit((key("k1"),), 1)).escalated is None  # the key alone is not escalated
        now[0] += 3600  # volume left the hour; the escalation set at 5000 s decayed (10 min) long ago
        fresh_a = RedisState(fresh.url, clock=lambda: now[0])  # a replica with no local memory of it
        assert (await fresh_a.admit((key("k2"), acme), 1)).escalated is None
        for s in (a, b, fresh_a):
            await s.close()

    run(body())


def test_a_dead_replicas_lease_expires_and_a_live_one_is_renewed(fresh):
    async def body():
        one = (key("d", max_concurrent=1),)
        alive, other = RedisState(fresh.url, lease_seconds=0.3), RedisState(fresh.url, lease_seconds=0.3)
        running = await alive.admit(one, 1)
        await asyncio.sleep(1.0)  # three lease lifetimes: renewed every 0.1 s
        with pytest.raises(Refusal, match="concurrent"):
            await other.admit(one, 1)
        await alive.close()  # the replica dies: no release, no more renewals
        with pytest.raises(Refusal, match="concurrent"):
            await other.admit(one, 1)
        await asyncio.sleep(0.4)
        await other.admit(one, 1)
        assert running.lease.shared
        await other.close()

    run(body())


def test_redis_down_falls_back_locally_logs_once_and_recovers(fresh, caplog):
    caplog.set_level(logging.INFO, logger="antidistill.server.state")

    async def body():
        state = RedisState(fresh.url, backoff=0.2)
        acme = account("acme", escalation=ESC, rpm=3)
        g = await state.admit((key("e"), acme), 1)
        await state.release(g.lease, 150)
        assert (await state.admit((key("e"), acme), 1)).escalated == 4  # escalated in Redis
        before = fallbacks("connection")
        fresh.stop()
        started = time.monotonic()
        grants = [await state.admit((key("e"), acme), 1)]
        with pytest.raises(Refusal, match="account 'acme': more than 3 requests per minute"):
            await state.admit((key("e"), acme), 1)  # the local windows enforce what this process saw
        assert time.monotonic() - started < 0.5, "nothing waits on a dead Redis"
        assert grants[0].escalated == 4, "an escalation that cannot be read never lowers λ"
        assert fallbacks("connection") >= before + 1
        await asyncio.sleep(0.3)
        await state.admit((key("f"),), 1)  # retried after the backoff: still down, still served
        down = [r for r in caplog.records if "not answering" in r.getMessage()]
        assert len(down) == 1, "one log line per outage"
        fresh.start()
        await asyncio.sleep(0.3)
        await state.admit((key("f", rpm=100),), 1)
        assert any("answering again" in r.getMessage() for r in caplog.records)
        assert REGISTRY.get_sample_value("antidistill_state_mode", {"mode": "redis"}) == 1
        counted = fresh.client().hvals("{antidistill}:req:key:f")
        assert sum(map(int, counted)) == 1, "shared state resumed"
        await state.close()

    run(body())


def test_a_frozen_redis_times_out_within_the_bound(fresh):
    async def body():
        state = RedisState(fresh.url, timeout=0.05, backoff=10)
        await state.admit((key("s"),), 1)
        before = fallbacks("timeout")
        fresh.pause()
        try:
            started = time.monotonic()
            grant = await state.admit((key("s", rpm=100),), 1)
            assert time.monotonic() - started < 0.3
            assert not grant.lease.shared and fallbacks("timeout") == before + 1
            started = time.monotonic()
            await state.admit((key("s"),), 1)  # inside the backoff: Redis is not even asked
            assert time.monotonic() - started < 0.01
        finally:
            fresh.resume()
        await state.release(grant.lease, 3)
        await state.close()

    run(body())


def test_memory_state_windows_and_escalation():
    now = [0.0]

    async def body():
        state = MemoryState(clock=lambda: now[0])
        k = (key("k", rpm=2, tpm=100, max_concurrent=5),)
        g1, g2 = await state.admit(k, 10), await state.admit(k, 10)
        with pytest.raises(Refusal) as err:
            await state.admit(k, 10)
        assert err.value.status == 429 and err.value.retry_after == 60
        now[0] = 30.0
        await state.release(g1.lease, 0)
        await state.release(g2.lease, 0)
        with pytest.raises(Refusal, match="requests per minute"):
            await state.admit(k, 10)
        now[0] = 61.0
        with pytest.raises(Refusal, match="tokens per minute"):
            await state.admit(k, 101)
        await state.admit(k, 50)
        watched = (key("w", escalation=ESC),)
        g = await state.admit(watched, 1)
        assert g.escalated is None
        await state.release(g.lease, 150)
        assert state.known_escalation(watched) == 4
        now[0] += 300  # within the decay period
        assert (await state.admit(watched, 1)).escalated == 4
        now[0] += 3600  # the volume left the hour window and the decay (10 min) has passed
        assert state.known_escalation(watched) is None

    run(body())


def test_config_carries_the_state_url(tmp_path):
    env: dict[str, str] = {}
    url = "redis://:s3cret@127.0.0.1:6390/2"
    GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin", state=url, state_lease_seconds=5).export(env)
    back = GatewayConfig.from_env(env)
    assert back.state == url and back.state_lease_seconds == 5 and "s3cret" not in repr(back)
    GatewayConfig(tiers=tmp_path / "t.yaml", ledger=tmp_path / "l.bin").export(env)
    assert GatewayConfig.from_env(env).state is None, "in memory unless serve was given --state"
    with pytest.raises(ValueError, match="expected a redis://") as err:
        check_state_url("http://user:s3cret@host/")
    assert "s3cret" not in str(err.value), "the URL may hold a password: never echoed"
    env[LEASE_ENV] = "0.5"
    with pytest.raises(GatewayConfigError, match="at least 1"):
        GatewayConfig.from_env(env)
    env[LEASE_ENV], env[STATE_TIMEOUT_ENV] = "5", "30"
    with pytest.raises(GatewayConfigError, match=r"between 0\.01 and 5"):
        GatewayConfig.from_env(env)
    env[STATE_TIMEOUT_ENV] = "1.5"
    assert GatewayConfig.from_env(env).state_timeout == 1.5


def test_redis_memory_is_flat_over_ten_thousand_requests(fresh):
    """A harvester's flood of ``max_tokens: 1`` requests must not fill the store (compose's Redis is
    256 MB ``noeviction``; once full, every replica falls back to local limits). Windows are buckets
    written only where a limit reads them: 10,000 requests of a rate-limited, escalating key leave
    the same handful of keys and fields as 1,000 do."""
    now = [10_000.0]

    async def body():
        state = RedisState(fresh.url, clock=lambda: now[0])
        scopes = (key("flood", rpm=10**6, tpm=10**9, max_concurrent=8, escalation=ESC), key("bare"))
        client = fresh.client()

        async def requests(count: int) -> None:
            for _ in range(count):
                grant = await state.admit(scopes, 2)
                await state.charge(grant.lease, 1)
                await state.release(grant.lease, 0)
                now[0] += 0.35  # 10,000 requests span about an hour of the windows

        def footprint() -> tuple[int, int]:
            keys = client.keys("*")
            fields = sum(client.hlen(k) for k in keys if client.type(k) == b"hash")
            return len(keys), fields

        await requests(1000)
        after_1k = footprint()
        await requests(9000)
        after_10k = footprint()
        assert after_10k[0] == after_1k[0] <= 4, "req, tok, out and nothing else (no lease left, no bare key)"
        assert after_10k[1] <= 60 + 60 + 61, after_10k
        assert not client.exists("{antidistill}:req:key:bare"), "a scope without limits writes nothing"
        assert (await state.admit(scopes, 2)).escalated == 4, "and the volume is still counted"
        await state.close()

    run(body())


def test_output_missed_in_an_outage_reaches_the_store_when_it_answers(fresh):
    """A replica that admits and releases while Redis is down owes that output to the shared
    escalation: it is sent once Redis answers, so another replica escalates the key too."""

    async def body():
        a = RedisState(fresh.url, lease_seconds=1, backoff=0.2)
        b = RedisState(fresh.url)
        scopes = (key("owed", escalation=ESC),)
        grant = await a.admit(scopes, 1)  # starts a's renewer, which also sends what is owed
        fresh.stop()
        await a.release(grant.lease, 150)  # > 100 per hour, counted nowhere but here
        assert a.owed_tokens() == 150
        fresh.start()
        deadline = time.monotonic() + 10
        while a.owed_tokens() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert a.owed_tokens() == 0, "the renewer sent the output once Redis answered"
        assert (await b.admit(scopes, 1)).escalated == 4, "the other replica sees the volume"
        await a.close()
        await b.close()

    run(body())
