"""Fail closed, unit level: the failure ledger between processes, the worker withholding a row that
has no Δ (budget, non-finite, exception, unreadable arguments), degrade mode, and the capacity
arithmetic that keeps the proxy pool at least as large as what vLLM can schedule."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from antidistill.benchmarks.tiny.serving import build_models
from antidistill.proxy_worker.runtime import capacity
from antidistill.proxy_worker.runtime.failure_ledger import FailureLedger, Reason, create
from antidistill.proxy_worker.runtime.protection import Protection
from antidistill.proxy_worker.runtime.settings import RequestArgs, parse_settings


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("fail-closed-models"))


@pytest.fixture()
def ledger(tmp_path):
    return FailureLedger(create(tmp_path / "ledger.bin", records=8))


def _append_in_child(path: str, tickets: list[int]) -> None:
    writer = FailureLedger(path)
    for ticket in tickets:
        writer.append(ticket, Reason.BUDGET, ticket)


def test_ledger_carries_records_across_processes(ledger):
    reader = FailureLedger(ledger.path)
    child = multiprocessing.get_context("spawn").Process(target=_append_in_child, args=(str(ledger.path), [7, 9]))
    child.start()
    child.join(60)
    batch = reader.read()
    assert [(r.ticket, r.reason, r.detail) for r in batch.records] == [(7, Reason.BUDGET, 7), (9, Reason.BUDGET, 9)]
    assert not batch.overflowed and reader.read().records == []


def test_ledger_reader_starts_at_the_present_and_detects_overflow(ledger):
    ledger.append(1, Reason.ERROR)
    late = FailureLedger(ledger.path)
    assert late.read().records == [], "a reader opened later does not see older failures"
    for ticket in range(2, 2 + 9):  # one more than the ring holds
        ledger.append(ticket, Reason.NON_FINITE)
    batch = late.read()
    assert batch.overflowed, "a reader a whole ring behind must know it lost records"
    assert [r.ticket for r in batch.records] == list(range(3, 11))


def test_ledger_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not an antidistillation failure ledger"):
        FailureLedger(path)


def protection_with(models, ledger, **overrides) -> Protection:
    settings = parse_settings(models.settings(**overrides), "test")
    return Protection.from_settings(settings, teacher_tokenizer=str(models.teacher), ledger=ledger)


def teacher_logits(rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(rows, 330, generator=gen) * 5
    logits[:, 7] = float("-inf")  # a token some other processor or grammar forbade
    return logits


def assert_withheld(row: torch.Tensor) -> None:
    """Uniform over what was allowed: nothing of the teacher (argmax, ranking) survives."""
    assert torch.isinf(row[7]) and row[7] < 0
    allowed = torch.cat([row[:7], row[8:]])
    assert torch.equal(allowed, torch.zeros_like(allowed))


def test_budget_failure_withholds_the_row_for_good_and_records_its_ticket(models, ledger):
    protection = protection_with(models, ledger, token_budget=32)
    reader = FailureLedger(ledger.path)
    protection.add(0, RequestArgs(2.0, "math", ticket=11), list(range(5, 45)), [])  # 40 tokens > 32
    protection.add(1, RequestArgs(2.0, "math", ticket=12), [5, 6, 7], [])
    protection.add(2, RequestArgs(0.0, "math"), [5, 6], [])
    for step in range(3):
        logits = teacher_logits(3)
        raw = logits.clone()
        protection.apply(logits)
        assert_withheld(logits[0])
        assert not torch.equal(logits[1], raw[1]) and torch.isfinite(logits[1, :7]).all(), "others still protected"
        assert torch.equal(logits[2], raw[2]), "λ = 0 rows are never touched"
        records = reader.read().records
        assert [(r.ticket, r.reason) for r in records] == ([(11, Reason.BUDGET)] if step == 0 else [])


def test_exception_in_the_step_withholds_every_row_of_that_profile(models, ledger, monkeypatch):
    protection = protection_with(models, ledger)
    reader = FailureLedger(ledger.path)
    protection.add(0, RequestArgs(1.0, "math", ticket=21), [5, 6, 7], [])
    protection.add(1, RequestArgs(1.0, "code", ticket=22), [5, 6, 7], [])

    def boom(indices):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(protection.engines["math"], "step", boom)
    logits = teacher_logits(2)
    protection.apply(logits)
    assert_withheld(logits[0])
    assert torch.isfinite(logits[1, :7]).all() and logits[1].abs().max() > 0
    assert [(r.ticket, r.reason) for r in reader.read().records] == [(21, Reason.ERROR)]


def test_non_finite_delta_degrade_serves_raw_and_counts_every_step(models, ledger):
    protection = protection_with(models, ledger)
    reader = FailureLedger(ledger.path)
    outputs: tuple[list[int], list[int]] = ([], [])
    protection.add(0, RequestArgs(1.0, "math", ticket=31, on_failure="degrade"), [5, 6, 7], outputs[0])
    protection.add(1, RequestArgs(1.0, "math", ticket=32), [5, 6, 8], outputs[1])
    protection.engines["math"].model.params["norm"][0, 0] = float("nan")
    for step in range(2):
        for output in outputs:
            output.extend([9] * step)  # a decode step: one new token per row
        logits = teacher_logits(2)
        raw = logits.clone()
        protection.apply(logits)
        assert torch.equal(logits[0], raw[0]), "degrade: Δ = 0, never a NaN"
        assert_withheld(logits[1])
    reasons = [(r.ticket, r.reason) for r in reader.read().records]
    assert reasons.count((31, Reason.NON_FINITE)) == 2 and reasons.count((32, Reason.NON_FINITE)) == 1


def test_unreadable_arguments_are_refused_not_served_raw(models, ledger):
    protection = protection_with(models, ledger)
    reader = FailureLedger(ledger.path)
    protection.add_unreadable(0, {"ad_lambda": 3.0, "ad_profile": "gone", "ad_ticket": 41}, "unknown profile")
    logits = teacher_logits(1)
    protection.apply(logits)
    assert_withheld(logits[0])
    assert [(r.ticket, r.reason) for r in reader.read().records] == [(41, Reason.BAD_ARGUMENTS)]
    protection.remove(0)
    logits = teacher_logits(1)
    raw = logits.clone()
    assert torch.equal(protection.apply(logits), raw), "the next occupant of the row is unaffected"


def test_capacity_plan_follows_whichever_side_is_free():
    headroom = capacity.headroom_tokens(max_model_len=2048, teacher_block_size=128, max_num_seqs=256)
    assert headroom == 2048
    capped = capacity.plan(None, None, 128, headroom, default_proxy_tokens=16384)
    assert capped.teacher_blocks == (16384 - 2048) // 128 and capped.proxy_tokens == 16384 and capped.coupled
    memory_bound = capacity.plan(None, None, 128, headroom, 16384, teacher_memory_blocks=50)
    assert memory_bound.teacher_blocks == 50 and memory_bound.coupled
    sized = capacity.plan(None, 400, 128, headroom, 16384)
    assert sized.proxy_tokens == 400 * 128 + 2048 and sized.coupled
    with pytest.raises(capacity.CapacityError, match="cannot hold"):
        capacity.plan(20000, 400, 128, headroom, 16384)
    with pytest.raises(capacity.CapacityError, match="cannot follow"):
        capacity.plan(1024, None, 128, headroom, 16384)
    assert capacity.headroom_tokens(100, 24, 8) == 112 + 8 * 16, "non-dividing teacher blocks cost a block a row"
    assert capacity.partial_prefills(2048, 0) == 1 and capacity.partial_prefills(2048, 512) == 5


def test_a_token_the_proxy_lacks_fails_its_row_not_the_engine(models, ledger):
    """The teacher's logits may be wider than the proxy's vocabulary: such an id would index past the
    proxy's embedding (a device assert on CUDA kills the engine); the row is refused instead."""
    protection = protection_with(models, ledger)
    reader = FailureLedger(ledger.path)
    vocab = protection.engines["math"].cfg.vocab_size
    protection.add(0, RequestArgs(1.0, "math", ticket=51), [5, 6, vocab + 3], [])
    protection.add(1, RequestArgs(1.0, "math", ticket=52), [5, 6, 7], [])
    logits = teacher_logits(2)
    protection.apply(logits)
    assert_withheld(logits[0])
    assert torch.isfinite(logits[1, :7]).all() and logits[1].abs().max() > 0
    assert [(r.ticket, r.reason) for r in reader.read().records] == [(51, Reason.VOCABULARY)]


class FakeApp:
    """An ASGI app streaming chunks, with a hook between them (where the worker may fail a row)."""

    def __init__(self, chunks: list[bytes], between) -> None:
        self.chunks, self.between = chunks, between

    async def __call__(self, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i, chunk in enumerate(self.chunks):
            self.between(i)
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(self.chunks) - 1})


def run_guarded(ledger, refuse: bool, chunks: list[bytes], fail_at: int, reason: Reason = Reason.BUDGET) -> list:
    import asyncio

    from antidistill.server.guard import FailureWatcher, ProtectionGuard

    sent: list = []

    async def send(message) -> None:
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)

    async def main() -> None:
        watcher = FailureWatcher(FailureLedger(ledger.path))
        watch = watcher.open(refuse)
        guard = ProtectionGuard(watch, watcher, send, receive)

        def between(i: int) -> None:
            if i == fail_at:
                ledger.append(watch.ticket, reason)

        await FakeApp(chunks, between)(guard.send)
        await guard.finish()
        watcher.close(watch)

    asyncio.run(main())
    return sent


def test_guard_refuses_before_and_after_the_first_token_and_flags_degraded_streams(ledger):
    chunks = [b"data: {1}\n\n", b"data: {2}\n\n", b"data: {3}\n\n"]
    early = run_guarded(ledger, True, chunks, fail_at=0)
    assert early[0]["status"] == 503 and len(early) == 2 and b"KV cache was full" in early[1]["body"]
    late = run_guarded(ledger, True, chunks, fail_at=2)
    bodies = [m["body"] for m in late if m["type"] == "http.response.body"]
    assert late[0]["status"] == 200 and bodies[:2] == chunks[:2], "protected tokens before the failure go out"
    assert b'"error"' in bodies[2] and bodies[3] == b"data: [DONE]\n\n" and len(bodies) == 4, "then nothing else"
    own = run_guarded(ledger, True, chunks, fail_at=0, reason=Reason.VOCABULARY)
    assert own[0]["status"] == 400, "the request's own tokens: a client error"
    degraded = run_guarded(ledger, False, chunks, fail_at=1)
    bodies = [m["body"] for m in degraded if m["type"] == "http.response.body"]
    assert bodies[0] == chunks[0] and bodies[1].startswith(b": antidistillation protection degraded")
    assert bodies[2:] == chunks[1:], "degrade serves everything, flagged in-band where headers are gone"
