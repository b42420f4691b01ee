"""Fail closed, unit level: the failure ledger between processes (and how its file is created), the
worker withholding a row that has no Δ (budget, non-finite, exception, unreadable arguments),
degrade mode's bounds (sticky failures refused, at most ``DEGRADE_STEPS`` steps served with Δ = 0,
a bounded number of ledger records), the gateway's guard reading all of that, and the capacity
arithmetic that keeps the proxy pool at least as large as what vLLM can schedule."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import stat
from collections.abc import Callable

import pytest
import torch
from antidistill.benchmarks.tiny.serving import build_models
from antidistill.proxy_worker.runtime import capacity
from antidistill.proxy_worker.runtime.failure_ledger import (
    FailureLedger,
    LedgerPathTaken,
    Reason,
    RowFailure,
    create,
    recreate,
)
from antidistill.proxy_worker.runtime.protection import DEGRADE_STEPS, Protection
from antidistill.proxy_worker.runtime.settings import RequestArgs, parse_settings
from antidistill.server.gateway.guard import POLL_SECONDS, FailureWatcher, ProtectionGuard, Watch


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("fail-closed-models"))


@pytest.fixture()
def ledger(tmp_path):
    return FailureLedger(create(tmp_path / "ledger.bin", records=8))


def _append_in_child(path: str, tickets: list[int]) -> None:
    writer = FailureLedger(path)
    for ticket in tickets:
        seq = writer.append(ticket, Reason.NON_FINITE, 1)
        writer.revise(seq, ticket, ticket)
    writer.append(tickets[0], Reason.NON_FINITE, tickets[0], refused=True)


def test_ledger_carries_records_across_processes(ledger):
    reader = FailureLedger(ledger.path)
    child = multiprocessing.get_context("spawn").Process(target=_append_in_child, args=(str(ledger.path), [7, 9]))
    child.start()
    child.join(60)
    batch = reader.read()
    got = [(r.ticket, r.reason, r.served, r.refused) for r in batch.records]
    assert got == [(7, Reason.NON_FINITE, 7, False), (9, Reason.NON_FINITE, 9, False), (7, Reason.NON_FINITE, 7, True)]
    assert not batch.overflowed and reader.read().records == []


def test_a_revised_record_is_reread_until_the_ring_overwrites_it(ledger):
    reader = FailureLedger(ledger.path)
    seq = ledger.append(5, Reason.ERROR, 1)
    [record] = reader.read().records
    assert ledger.revise(seq, 5, 4) and reader.reread(record).served == 4 and not reader.reread(record).refused
    assert reader.read().records == [], "a revision is no new record"
    for ticket in range(100, 100 + ledger.capacity):
        ledger.append(ticket, Reason.ERROR)
    assert reader.reread(record) is None and not ledger.revise(seq, 5, 5), "overwritten: the writer must append"


def test_ledger_is_never_created_through_a_symlink_or_over_a_file(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    link = tmp_path / "ledger.bin"
    link.symlink_to(target)
    with pytest.raises(LedgerPathTaken, match="symlink"):
        create(link)
    with pytest.raises(LedgerPathTaken, match="symlink"):
        recreate(link)
    assert target.read_bytes() == b"precious" and link.is_symlink()
    with pytest.raises(LedgerPathTaken):
        create(target)
    with pytest.raises(LedgerPathTaken):
        recreate(target)  # not a ledger: an operator's path naming some other file is not removed
    assert target.read_bytes() == b"precious"
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(LedgerPathTaken):
        create(dangling)
    assert not (tmp_path / "nowhere").exists(), "a dangling symlink is not followed to create its target"
    with pytest.raises(OSError):
        FailureLedger(link)  # the reader and the worker do not follow one either


@pytest.mark.parametrize("umask", [0, 0o277], ids=["open", "owner-read-only"])
def test_ledger_is_private_whatever_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = create(tmp_path / "ledger.bin", records=8)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "0600 exactly: not wider, and writable by its owner"
    FailureLedger(path).append(3, Reason.ERROR)
    again = recreate(path, records=8)  # a restart with the operator's fixed path: a fresh, empty ledger
    assert stat.S_IMODE(again.stat().st_mode) == 0o600
    fresh = FailureLedger(again)
    assert int(fresh.words[2]) == 0 and fresh.capacity == 8


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


def decode(outputs: tuple[list[int], ...]) -> None:
    for output in outputs:
        output.append(9)  # one new token per row


def records_of(reader: FailureLedger) -> list[tuple[int, Reason, int, bool]]:
    return [(r.ticket, r.reason, r.served, r.refused) for r in reader.read().records]


def test_degrade_serves_transient_failures_for_a_bounded_number_of_steps(models, ledger):
    """A harvester on a degrade tier that can make the proxy fail gets at most DEGRADE_STEPS raw
    tokens per request; the ledger holds one revised record per reason and one refusal, however long
    the failure lasts (it cannot fill the ring), and its count is every step served with Δ = 0."""
    protection = protection_with(models, ledger)
    reader = FailureLedger(ledger.path)
    outputs: tuple[list[int], list[int]] = ([], [])
    protection.add(0, RequestArgs(1.0, "math", ticket=31, on_failure="degrade"), [5, 6, 7], outputs[0])
    protection.add(1, RequestArgs(1.0, "math", ticket=32), [5, 6, 8], outputs[1])
    protection.engines["math"].model.params["norm"][0, 0] = float("nan")
    seen = []
    for step in range(DEGRADE_STEPS + 20):
        logits = teacher_logits(2)
        raw = logits.clone()
        protection.apply(logits)
        if step < DEGRADE_STEPS:
            assert torch.equal(logits[0], raw[0]), "degrade: Δ = 0, never a NaN"
        else:
            assert_withheld(logits[0])
        assert_withheld(logits[1])
        seen += records_of(reader)
        decode(outputs)
    assert seen == [
        (31, Reason.NON_FINITE, 1, False),
        (32, Reason.NON_FINITE, 0, True),
        (31, Reason.NON_FINITE, DEGRADE_STEPS, True),
    ]
    assert protection.rows[0].degraded_steps == DEGRADE_STEPS


def test_the_degraded_count_is_revised_in_place_every_step(models, ledger):
    protection = protection_with(models, ledger)
    reader = FailureLedger(ledger.path)
    output: list[int] = []
    protection.add(0, RequestArgs(1.0, "math", ticket=33, on_failure="degrade"), [5, 6, 7], output)
    protection.engines["math"].model.params["norm"][0, 0] = float("nan")
    protection.apply(teacher_logits(1))
    [record] = reader.read().records
    for step in range(2, 5):
        decode((output,))
        protection.apply(teacher_logits(1))
        assert reader.reread(record).served == step and reader.read().records == []


@pytest.mark.parametrize("sticky", ["budget", "vocabulary"])
def test_a_sticky_failure_refuses_a_degrade_row_at_once(models, ledger, sticky):
    """Losing its KV or holding a token the proxy lacks lasts the whole request: degrading would
    leave the rest of it raw, so a degrade row is refused as a refuse row is (one record)."""
    protection = protection_with(models, ledger, token_budget=32)
    reader = FailureLedger(ledger.path)
    vocab = protection.engines["math"].cfg.vocab_size
    prompt = list(range(5, 45)) if sticky == "budget" else [5, 6, vocab + 3]  # 40 tokens > the 32 pool
    output: list[int] = []
    protection.add(0, RequestArgs(2.0, "math", ticket=61, on_failure="degrade"), prompt, output)
    for _ in range(5):
        logits = teacher_logits(1)
        protection.apply(logits)
        assert_withheld(logits[0])
        decode((output,))
    assert records_of(reader) == [(61, Reason[sticky.upper()], 0, True)]


def test_failures_of_both_transient_kinds_are_bounded_together(models, ledger, monkeypatch):
    """Alternating a non-finite Δ and a failed step: one record per reason, the count shared."""
    protection = protection_with(models, ledger)
    reader = FailureLedger(ledger.path)
    engine = protection.engines["math"]
    real = engine.step
    raising = [True]

    def flaky(indices):
        if raising[0]:
            raise RuntimeError("injected")  # the batched step and its one-row retry alike
        result = real(indices)
        result.delta[:] = 0.0
        result.failed = {i: RowFailure(Reason.NON_FINITE, "injected") for i in indices}
        return result

    monkeypatch.setattr(engine, "step", flaky)
    output: list[int] = []
    protection.add(0, RequestArgs(1.0, "math", ticket=71, on_failure="degrade"), [5, 6, 7], output)
    for step in range(3 * DEGRADE_STEPS):
        raising[0] = step % 2 == 0
        protection.apply(teacher_logits(1))
        decode((output,))
    records = records_of(reader)
    assert [(t, reason, refused) for t, reason, _, refused in records] == [
        (71, Reason.ERROR, False),
        (71, Reason.NON_FINITE, False),
        (71, Reason.ERROR, True),
    ]
    assert records[-1][2] == DEGRADE_STEPS and protection.rows[0].refused == Reason.ERROR


class BrokenLedger:
    def append(self, *args) -> int:
        raise OSError("disk full (injected)")

    def revise(self, *args) -> bool:
        raise OSError("disk full (injected)")


def test_a_degraded_step_the_ledger_cannot_record_is_withheld_instead(models):
    """Unrecorded, a step served with Δ = 0 would be raw text the gateway reports as protected."""
    protection = protection_with(models, BrokenLedger())
    protection.add(0, RequestArgs(1.0, "math", ticket=81, on_failure="degrade"), [5, 6, 7], [])
    protection.engines["math"].model.params["norm"][0, 0] = float("nan")
    logits = teacher_logits(1)
    protection.apply(logits)
    assert_withheld(logits[0])
    assert protection.rows[0].degraded_steps == 0 and protection.rows[0].refused == Reason.NON_FINITE


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


Worker = Callable[[FailureLedger, int], None]  # what the worker writes for a ticket, before a chunk


def run_guarded(ledger, refuse: bool, chunks: list[bytes], worker: dict[int, Worker]) -> tuple[list, Watch]:
    """Stream ``chunks`` through a guard; before chunk i the worker does ``worker[i]``."""
    sent: list = []

    async def send(message) -> None:
        sent.append(message)

    async def receive():
        await asyncio.sleep(3600)

    async def main() -> Watch:
        watcher = FailureWatcher(FailureLedger(ledger.path))
        watch = watcher.open(refuse)
        guard = ProtectionGuard(watch, watcher, send, receive)

        def between(i: int) -> None:
            if i in worker:
                worker[i](ledger, watch.ticket)

        await FakeApp(chunks, between)(guard.send)
        await guard.finish()
        watcher.close(watch)
        return watch

    return sent, asyncio.run(main())


def failing(reason: Reason = Reason.BUDGET, served: int = 0, refused: bool = True) -> Worker:
    return lambda ledger, ticket: ledger.append(ticket, reason, served, refused) and None


def bodies_of(sent: list) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body"]


CHUNKS = [b"data: {1}\n\n", b"data: {2}\n\n", b"data: {3}\n\n", b"data: {4}\n\n"]


def test_guard_refuses_before_and_after_the_first_token(ledger):
    early, watch = run_guarded(ledger, True, CHUNKS, {0: failing()})
    assert early[0]["status"] == 503 and len(early) == 2 and b"KV cache was full" in early[1]["body"]
    assert not watch.protected and watch.failed_steps == 0, "refused at once: nothing was served raw"
    late, _ = run_guarded(ledger, True, CHUNKS, {2: failing()})
    bodies = bodies_of(late)
    assert late[0]["status"] == 200 and bodies[:2] == CHUNKS[:2], "protected tokens before the failure go out"
    assert len(bodies) == 3 and b'"error"' in bodies[2], "then nothing else"
    assert bodies[2].endswith(b"\n\ndata: [DONE]\n\n")
    own, _ = run_guarded(ledger, True, CHUNKS, {0: failing(Reason.VOCABULARY)})
    assert own[0]["status"] == 400, "the request's own tokens: a client error"


def test_guard_flags_degraded_streams_with_the_workers_count(ledger):
    """One record, revised in place by the worker: the gateway reports the last count, not 1."""
    seqs: list[int] = []

    def first(ledger, ticket):
        seqs.append(ledger.append(ticket, Reason.NON_FINITE, 1))

    def more(served):
        return lambda ledger, ticket: ledger.revise(seqs[0], ticket, served) and None

    sent, watch = run_guarded(ledger, False, CHUNKS, {1: first, 2: more(2), 3: more(5)})
    bodies = bodies_of(sent)
    degraded = b": antidistillation protection degraded"
    assert bodies[0] == CHUNKS[0] and bodies[1].startswith(degraded) and bodies[2] == CHUNKS[1]
    assert bodies[3].startswith(degraded) and bodies[5].startswith(degraded) and bodies[-1] == CHUNKS[3]
    assert [b for b in bodies if not b.startswith(degraded)] == CHUNKS, "degrade serves every chunk, flagged"
    assert watch.failed_steps == 5 and not watch.refuse and not watch.protected
    assert watch.reason == Reason.NON_FINITE


def test_guard_refuses_a_degrade_request_the_worker_refused(ledger):
    sent, watch = run_guarded(ledger, False, CHUNKS, {1: failing(Reason.NON_FINITE, 1, False), 3: failing(served=3)})
    bodies = bodies_of(sent)
    assert sent[0]["status"] == 200 and bodies[:3] == [CHUNKS[0], bodies[1], CHUNKS[1]]
    assert CHUNKS[3] not in bodies and b'"error"' in bodies[-1] and bodies[-1].endswith(b"\n\ndata: [DONE]\n\n")
    assert b"KV cache was full" in bodies[-1], "the refusal's reason, not the first failure's"
    assert watch.refuse and watch.failed_steps == 3 and watch.status() == 503
    first, watch = run_guarded(ledger, False, CHUNKS, {0: failing(Reason.VOCABULARY)})
    assert first[0]["status"] == 400 and watch.refuse and watch.failed_steps == 0


def test_a_degrade_request_the_worker_refused_is_aborted_in_the_engine(ledger):
    """vLLM aborts a request whose receive channel reports a disconnect: a degrade request too."""

    async def main() -> dict:
        watcher = FailureWatcher(FailureLedger(ledger.path))
        watch = watcher.open(refuse=False)
        guard = ProtectionGuard(watch, watcher, lambda m: asyncio.sleep(0), lambda: asyncio.sleep(3600))
        listening = asyncio.ensure_future(guard.receive())
        ledger.append(watch.ticket, Reason.NON_FINITE, 2)
        await asyncio.sleep(5 * POLL_SECONDS)
        assert not listening.done(), "a degraded step is no refusal"
        ledger.append(watch.ticket, Reason.NON_FINITE, 8, refused=True)
        message = await asyncio.wait_for(listening, 5)
        watcher.close(watch)
        return message

    assert asyncio.run(main()) == {"type": "http.disconnect"}


def test_a_degraded_record_lost_to_the_ring_makes_the_request_unverifiable(ledger):
    def first(ledger, ticket):
        ledger.append(ticket, Reason.NON_FINITE, 1)

    def flood(ledger, ticket):  # other requests' records overwrite it (a ring since it was read: no overflow)
        for other in range(ledger.capacity):
            ledger.append(10**6 + other, Reason.ERROR)

    sent, watch = run_guarded(ledger, False, CHUNKS, {1: first, 2: flood})
    assert watch.unverifiable and not watch.protected and not watch.refuse
    assert [b for b in bodies_of(sent) if not b.startswith(b":")] == CHUNKS
