"""The engine under vLLM-style batch churn: random add/fork/extend/remove/move/swap/rebuild sequences
over rows that often share prefixes must leave every row's Δ equal to a fresh recomputation from
its tokens alone, with shared blocks reference-counted and never written by a row that took them."""

from __future__ import annotations

import itertools
import random
import tempfile
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch
from antidistill.benchmarks.tiny.models import save_tiny
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.delta import finite_difference
from antidistill.proxy_worker.core.model import KVStore, StackedProxy, step_bytes
from antidistill.proxy_worker.core.plan import StepPlan, build_plan
from antidistill.proxy_worker.core.weights import load_proxy_state, perturbed_copies, stack_copies
from antidistill.proxy_worker.runtime.cache import ProxyKVCache, RowState
from antidistill.proxy_worker.runtime.engine import ProxyEngine
from antidistill.proxy_worker.runtime.failure_ledger import Reason
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch.profiler import ProfilerActivity, profile

EPS = 0.1
VOCAB = 300
SLOTS = 6


@cache
def two_copy_model() -> StackedProxy:
    path = save_tiny(Path(tempfile.mkdtemp()) / "m", "qwen2", vocab_size=VOCAB, layers=2)
    cfg = load_config(path)
    theta = load_proxy_state(path, cfg)
    gen = torch.Generator().manual_seed(5)
    grad = {k: torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    return StackedProxy(cfg, stack_copies(perturbed_copies(theta, grad, (EPS, -EPS)), cfg, torch.float32))


def fresh_delta(tokens: list[int]) -> torch.Tensor:
    model = two_copy_model()
    return finite_difference(model.logits(build_plan([tokens], [0])), EPS)[0]


tokens_st = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24)
_rng = random.Random(11)
PREFIXES = [[_rng.randrange(VOCAB) for _ in range(14)] for _ in range(2)]
# a shared random prefix (often cut inside a block) plus a suffix: rows share full blocks often
prompts_st = st.builds(
    lambda prefix, cut, suffix: prefix[:cut] + suffix,
    st.sampled_from(PREFIXES),
    st.integers(0, 14),
    st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10),
)


class WriteCheck:
    """The engine's model, checking every pass's KV writes: a row writes only blocks it allocated
    (past its ``shared`` ones), and never a block already written whole."""

    def __init__(self, engine: ProxyEngine) -> None:
        self.model, self.cache = engine.model, engine.cache
        self.rows: list[RowState] = []
        paged = self.cache.paged
        self.cache.paged = lambda rows: (self.rows.__setitem__(slice(None), rows), paged(rows))[1]

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)

    def logits(self, plan: StepPlan, kv: KVStore | None = None, output: str = "last") -> torch.Tensor:
        bs, ends = self.cache.block_size, plan.last_index.tolist()
        for row, start, end in zip(self.rows, [-1, *ends[:-1]], ends, strict=True):
            positions = plan.positions[start + 1 : end + 1].tolist()
            blocks = (plan.write_index[start + 1 : end + 1] // bs).tolist()
            assert all(p // bs >= row.shared for p in positions), "a row wrote a block it took from another row"
            assert all(row.blocks[p // bs] == b for p, b in zip(positions, blocks, strict=True))
            assert not any(self.cache.written[b] for b in blocks), "a pass rewrote a complete block"
        return self.model.logits(plan, kv, output)


class EngineMachine(RuleBasedStateMachine):
    """Mirror of the engine's rows as plain token lists; steps compare against recomputation."""

    def __init__(self) -> None:
        super().__init__()
        self.engine = ProxyEngine(two_copy_model(), EPS, token_budget=96, block_size=4, max_pass_tokens=7)
        self.engine.model = WriteCheck(self.engine)
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    @rule(index=st.integers(0, SLOTS - 1), prompt=prompts_st)
    def add(self, index: int, prompt: list[int]) -> None:
        output: list[int] = []
        self.engine.add(index, prompt, output)
        self.rows[index] = (prompt, output)

    @precondition(lambda self: self.rows)
    @rule(data=st.data(), index=st.integers(0, SLOTS - 1), suffix=st.lists(st.integers(0, VOCAB - 1), max_size=5))
    def fork(self, data: st.DataObject, index: int, suffix: list[int]) -> None:
        """A new request whose prompt is (a prefix of) another row's history: shares output blocks too."""
        prompt, output = self.rows[data.draw(st.sampled_from(sorted(self.rows)))]
        history = prompt + output
        self.add(index, history[: data.draw(st.integers(1, len(history)))] + suffix)

    @precondition(lambda self: self.rows)
    @rule(data=st.data(), new=tokens_st)
    def extend(self, data: st.DataObject, new: list[int]) -> None:
        index = data.draw(st.sampled_from(sorted(self.rows)))
        self.rows[index][1].extend(new[:3])

    @rule(index=st.integers(0, SLOTS - 1))
    def remove(self, index: int) -> None:
        self.engine.remove(index)
        self.rows.pop(index, None)

    @rule(src=st.integers(0, SLOTS - 1), dst=st.integers(0, SLOTS - 1))
    def move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        self.engine.move(src, dst)
        row = self.rows.pop(src, None)
        self.rows.pop(dst, None)
        if row is not None:
            self.rows[dst] = row

    @rule(a=st.integers(0, SLOTS - 1), b=st.integers(0, SLOTS - 1))
    def swap(self, a: int, b: int) -> None:
        if a == b:
            return
        self.engine.swap(a, b)
        ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
        if ra is not None:
            self.rows[b] = ra
        if rb is not None:
            self.rows[a] = rb

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def rebuild(self, data: st.DataObject) -> None:
        self.engine.rebuild(data.draw(st.sampled_from(sorted(self.rows))))

    @precondition(lambda self: self.rows)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        chosen = data.draw(st.lists(st.sampled_from(sorted(self.rows)), min_size=1, unique=True))
        result = self.engine.step(chosen)
        assert result.delta.shape == (len(chosen), VOCAB)
        for pos, index in enumerate(chosen):
            prompt, output = self.rows[index]
            if index in result.failed:
                assert result.failed[index].reason is Reason.BUDGET and "budget" in result.failed[index].message
                assert torch.equal(result.delta[pos], torch.zeros(VOCAB))
                assert len(prompt) + len(output) > 0
                continue
            expected = fresh_delta(prompt + output)
            assert torch.allclose(result.delta[pos], expected, atol=5e-4, rtol=1e-4), index

    @invariant()
    def blocks_are_counted_and_bounded(self) -> None:
        cache: ProxyKVCache = self.engine.cache
        held = Counter(b for row in cache.rows.values() for b in row.blocks)
        assert all(len(set(row.blocks)) == len(row.blocks) for row in cache.rows.values())
        assert all(cache.refs[b] == held[b] for b in range(cache.num_blocks))
        assert cache.used_tokens == len(held) * cache.block_size <= cache.capacity_tokens
        assert cache.free_blocks == cache.num_blocks - len(held)
        assert cache.registered_blocks <= len(held)
        for row in cache.rows.values():
            assert row.shared * cache.block_size <= row.computed <= row.length
            assert all(cache.written[b] for b in row.blocks[: row.shared])
        assert set(cache.rows) == set(self.rows)

    def teardown(self) -> None:
        for index in list(self.rows):
            self.engine.remove(index)
        assert self.engine.cache.used_tokens == 0


EngineMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
)
TestEngineChurn = EngineMachine.TestCase


def test_budget_exhaustion_fails_only_that_row_and_recovers():
    engine = ProxyEngine(two_copy_model(), EPS, token_budget=32, block_size=8)
    small, big = [1, 2, 3], list(range(40))
    engine.add(0, small)
    engine.add(1, big)
    result = engine.step([0, 1])
    assert result.failed[1].reason is Reason.BUDGET and "budget exhausted" in result.failed[1].message
    assert 0 not in result.failed
    assert torch.allclose(result.delta[0], fresh_delta(small), atol=5e-4)
    # the failed row holds nothing; removing it and adding a row that fits works
    assert engine.cache.used_tokens == 8
    engine.remove(1)
    engine.add(1, big[:20])
    assert not engine.step([0, 1]).failed


def test_each_failed_row_carries_its_reason():
    """The engine says why (the ledger and metric label), not only a message: an unknown row or an
    empty one is an error, a token the proxy cannot embed a vocabulary failure that stays."""
    engine = ProxyEngine(two_copy_model(), EPS, token_budget=64, block_size=8)
    engine.add(1, [])
    engine.add(2, [1, 2, VOCAB + 5])
    engine.add(3, [1, 2, 3])
    result = engine.step([0, 1, 2, 3])
    assert {i: f.reason for i, f in result.failed.items()} == {0: Reason.ERROR, 1: Reason.ERROR, 2: Reason.VOCABULARY}
    assert f"token id {VOCAB + 5}" in result.failed[2].message and "never added" in result.failed[0].message
    assert torch.equal(result.delta[:3], torch.zeros(3, VOCAB))
    assert engine.step([2]).failed[2].reason is Reason.VOCABULARY


def test_chunked_prefill_row_asked_twice_reuses_delta():
    engine = ProxyEngine(two_copy_model(), EPS, token_budget=64, block_size=4)
    engine.add(3, [5, 6, 7, 8])
    first = engine.step([3])
    again = engine.step([3])
    assert first.prefill_tokens == 4 and again.prefill_tokens == again.decode_tokens == 0
    assert torch.equal(first.delta, again.delta)


def test_shrunk_history_is_recomputed():
    engine = ProxyEngine(two_copy_model(), EPS, token_budget=64, block_size=4)
    output = [9, 10, 11]
    engine.add(0, [1, 2], output)
    engine.step([0])
    del output[1:]
    assert torch.allclose(engine.step([0]).delta[0], fresh_delta([1, 2, 9]), atol=5e-4)


def test_rows_sharing_a_long_prefix_hold_it_once_and_match_unshared():
    """64 requests on one 1,000-token system prompt, all added in the same step: the first writes
    the prefix, the others take its blocks (waiting for them to be written) and compute only their
    suffixes; Δ is what each row gets alone."""
    rng = random.Random(3)
    prefix = [rng.randrange(VOCAB) for _ in range(1000)]
    suffixes = [[i, *(rng.randrange(VOCAB) for _ in range(rng.randint(2, 9)))] for i in range(64)]
    engine = ProxyEngine(two_copy_model(), EPS, token_budget=64 * 1100, block_size=16)
    for i, suffix in enumerate(suffixes):
        engine.add(i, prefix + suffix)
    result = engine.step(range(64))
    assert not result.failed
    full = len(prefix) // 16
    blocks = full + sum(-(-(len(prefix) + len(s)) // 16) - full for s in suffixes)
    assert engine.cache.used_tokens == 16 * blocks
    assert engine.cache.used_tokens <= 1000 + sum(len(s) for s in suffixes) + 64 * 16 < 64_000 / 20
    assert result.prefill_tokens == len(prefix) + sum(len(s) for s in suffixes) + 63 * (len(prefix) - 16 * full)
    for i in [*range(0, 64, 4), 63]:  # the writer and readers across the batch (a fresh 1k pass each)
        assert torch.allclose(result.delta[i], fresh_delta(prefix + suffixes[i]), atol=5e-4, rtol=1e-4), i


def test_prefix_is_shared_across_requests_while_resident():
    prefix = list(range(1, 41))
    engine = ProxyEngine(two_copy_model(), EPS, token_budget=256, block_size=8)
    engine.add(0, [*prefix, 50])
    engine.step([0])
    engine.add(1, [*prefix, 60, 61])
    result = engine.step([1])
    assert result.prefill_tokens == 2 and engine.cache.used_tokens == 8 * (5 + 1 + 1)
    assert torch.allclose(result.delta[0], fresh_delta([*prefix, 60, 61]), atol=5e-4, rtol=1e-4)
    engine.remove(0)
    engine.remove(1)
    assert engine.cache.used_tokens == 0 and engine.cache.registered_blocks == 0
    engine.add(2, [*prefix, 70])
    assert engine.step([2]).prefill_tokens == len(prefix) + 1


def test_interrupted_step_leaves_no_row_waiting_on_unwritten_blocks(monkeypatch):
    prefix = list(range(1, 33))
    engine = ProxyEngine(two_copy_model(), EPS, token_budget=256, block_size=8)
    engine.add(0, [*prefix, 50])
    engine.add(1, [*prefix, 60])
    with monkeypatch.context() as m:
        m.setattr(engine.model, "logits", lambda *a, **k: (_ for _ in ()).throw(MemoryError("injected")))
        with pytest.raises(MemoryError):
            engine.step([0, 1])
    result = engine.step([1, 0])
    assert not result.failed
    assert torch.allclose(result.delta[0], fresh_delta([*prefix, 60]), atol=5e-4, rtol=1e-4)
    assert torch.allclose(result.delta[1], fresh_delta([*prefix, 50]), atol=5e-4, rtol=1e-4)


def peak_transient_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes allocated and not yet freed while ``fn`` runs (the profiler's allocator events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events), default=0)


def test_mixed_pass_memory_is_bounded_by_its_tokens():
    """One 512-token prefill chunk at context 1,000 among 32 decode rows at context ~1,000: the step's
    peak transient memory stays under ``step_bytes`` and far under the old all-rows padding."""
    model = two_copy_model()
    cfg, rng = model.cfg, random.Random(4)
    prefix = [rng.randrange(VOCAB) for _ in range(992)]
    engine = ProxyEngine(model, EPS, token_budget=40_000, block_size=16, max_pass_tokens=512)
    outputs: list[list[int]] = [[] for _ in range(33)]
    for i in range(33):
        engine.add(i, prefix + [i] * 8, outputs[i])
    assert not engine.step(range(33)).failed
    for i in range(32):
        outputs[i].append(i)
    outputs[32].extend(rng.randrange(VOCAB) for _ in range(512))
    queries, keys = [1] * 32 + [512], [1001] * 32 + [1512]
    result = None

    def run() -> None:
        nonlocal result
        result = engine.step(range(33))

    peak = peak_transient_bytes(run)
    assert not result.failed and result.decode_tokens == 32 and result.prefill_tokens == 512
    bound = step_bytes(cfg, 2, 4, queries, keys, engine.cache.block_size)
    padded_scores = 4 * 2 * cfg.num_heads * 33 * 512 * 1512
    assert peak <= bound < padded_scores / 4
    assert peak < padded_scores / 10
    assert torch.allclose(result.delta[32], fresh_delta(prefix + [32] * 8 + outputs[32]), atol=5e-4, rtol=1e-4)


def test_non_finite_delta_is_reported_per_row_and_never_reused_as_a_delta():
    """Poisoned KV in one row's prefix: that row (only) is a NON_FINITE failure with Δ = 0, on the step
    and when asked again with nothing new (its stored Δ is gone, so a retry cannot serve it silently);
    the other row's Δ is exact. The flags reach the host in one copy per pass, Δ is zeroed on the device."""
    engine = ProxyEngine(two_copy_model(), EPS, token_budget=64, block_size=4)
    outputs: tuple[list[int], list[int]] = ([], [])
    prompts = ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    for i in range(2):
        engine.add(i, prompts[i], outputs[i])
    assert not engine.step([0, 1]).failed
    poisoned = engine.cache.rows[0].blocks[0] * engine.cache.block_size + 1  # row 0's position 1
    engine.cache.store.k[1][0, :, poisoned] = float("nan")
    for output in outputs:
        output.append(11)
    result = engine.step([0, 1])
    assert {i: f.reason for i, f in result.failed.items()} == {0: Reason.NON_FINITE}
    assert torch.equal(result.delta[0], torch.zeros(VOCAB))
    assert torch.allclose(result.delta[1], fresh_delta([*prompts[1], 11]), atol=5e-4, rtol=1e-4)
    again = engine.step([1, 0])
    assert {i: f.reason for i, f in again.failed.items()} == {0: Reason.NON_FINITE}
    assert torch.equal(again.delta[1], torch.zeros(VOCAB)) and torch.equal(again.delta[0], result.delta[1])
