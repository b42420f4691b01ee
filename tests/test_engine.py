"""The engine under vLLM-style batch churn: random add/extend/remove/move/swap/rebuild sequences
must leave every row's Δ equal to a fresh recomputation from its tokens alone."""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from proxy_worker.cache import ProxyKVCache
from proxy_worker.config import load_config
from proxy_worker.delta import finite_difference
from proxy_worker.engine import ProxyEngine
from proxy_worker.model import StackedProxy
from proxy_worker.plan import build_plan
from proxy_worker.weights import load_proxy_state, perturbed_copies, stack_copies
from tests.tiny_models import save_tiny

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


class EngineMachine(RuleBasedStateMachine):
    """Mirror of the engine's rows as plain token lists; steps compare against recomputation."""

    def __init__(self) -> None:
        super().__init__()
        self.engine = ProxyEngine(two_copy_model(), EPS, token_budget=96, block_size=4, max_pass_tokens=7)
        self.rows: dict[int, tuple[list[int], list[int]]] = {}

    @rule(index=st.integers(0, SLOTS - 1), prompt=tokens_st)
    def add(self, index: int, prompt: list[int]) -> None:
        output: list[int] = []
        self.engine.add(index, prompt, output)
        self.rows[index] = (prompt, output)

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
                assert "budget" in result.failed[index]
                assert torch.equal(result.delta[pos], torch.zeros(VOCAB))
                assert len(prompt) + len(output) > 0
                continue
            expected = fresh_delta(prompt + output)
            assert torch.allclose(result.delta[pos], expected, atol=5e-4, rtol=1e-4), index

    @invariant()
    def blocks_are_disjoint_and_bounded(self) -> None:
        cache: ProxyKVCache = self.engine.cache
        owned = [b for row in cache.rows.values() for b in row.blocks]
        assert len(owned) == len(set(owned))
        assert cache.used_tokens == len(owned) * cache.block_size <= cache.capacity_tokens
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
    assert 1 in result.failed and "budget" in result.failed[1]
    assert 0 not in result.failed
    assert torch.allclose(result.delta[0], fresh_delta(small), atol=5e-4)
    # the failed row holds nothing; removing it and adding a row that fits works
    assert engine.cache.used_tokens == 8
    engine.remove(1)
    engine.add(1, big[:20])
    assert not engine.step([0, 1]).failed


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
