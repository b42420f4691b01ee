"""The EXPERIMENTAL V2-runner adapter against vLLM's real V2 interface objects (LogitsContext,
LogitsProcRequestState). The V2 runner itself needs Triton's GPU backend; its token buffers are
replaced here by CPU tensors with the same attributes (``.gpu``, ``.np``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from antidistill.proxy_worker.runtime.vllm_v2 import SPEC_DECODE_REFUSED, AntidistillationLogitsProcessorV2
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

from tests.worker import v2_runner
from tests.worker.v2_runner import (
    VOCAB,
    assert_steps,
    commit,
    context,
    params,
    protected_as,
)

# the V2 runner fixtures (tests/worker/v2_runner.py): the same tiny models and processor factory
make_runner = v2_runner.make_runner
models = v2_runner.models
runner = v2_runner.runner


def spy_steps(proc):
    """Record every proxy step's result per profile (prefill vs decode tokens)."""
    results = []
    for name, engine in proc.protection.engines.items():
        step = engine.step

        def recording(indices, step=step, name=name):
            result = step(indices)
            results.append((name, list(indices), result))
            return result

        engine.step = recording
    return results


def test_v2_adapter_follows_slots_through_reordered_steps(runner, models):
    proc, state = runner
    histories = {2: [5, 6, 7, 8], 5: [9, 10], 0: [11, 12, 13]}
    assert proc.add_request(2, params(2.0)) is True
    assert proc.add_request(5, params(0.0)) is False, "λ = 0 declines the row"
    assert proc.add_request(0, params(1.0, "code")) is True
    lams = {2: (2.0, "math"), 0: (1.0, "code")}
    assert_steps(models, proc, state, histories, lams, [[2, 5, 0], [0, 2, 5], [5, 0, 2]])


def test_v2_absent_slot_keeps_its_proxy_state_and_is_not_reprefilled(runner, models):
    """A slot the scheduler skipped for a step resumes from its proxy KV: one decode token, no
    prefill, and no read of the device history (scrambled here, so a re-read would give a wrong Δ)."""
    proc, state = runner
    histories = {3: [40, 41, 42, 43], 6: [50, 51]}
    proc.add_request(3, params(2.0))
    proc.add_request(6, params(2.0))
    for s in histories:
        commit(state, s, histories[s])
    proc.apply(torch.zeros(2, VOCAB), context([3, 6], histories))
    histories[6].append(52)
    commit(state, 6, histories[6])
    proc.apply(torch.zeros(1, VOCAB), context([6], histories))  # slot 3 skipped, nothing committed for it
    assert 3 in proc.protection.rows and proc.protection.engines["math"].cache.rows[3].computed == 4
    histories[3].append(44)  # its next token, sampled before the skip, arrives as input
    state.all_token_ids.gpu[3, :] = 7  # never read again
    steps = spy_steps(proc)
    logits = torch.zeros(1, VOCAB)
    proc.apply(logits, context([3], histories))
    (_, indices, result), *_ = steps
    assert indices == [3] and (result.prefill_tokens, result.decode_tokens) == (0, 1)
    assert protected_as(models, logits[0], torch.zeros(VOCAB), 2.0, "math", [40, 41, 42, 43, 44])


def test_v2_slot_reuse_resets_everything_the_slot_held(runner, models):
    proc, state = runner
    old = [60, 61, 62, 63, 64]
    proc.add_request(2, params(2.0))
    commit(state, 2, old)
    proc.apply(torch.zeros(1, VOCAB), context([2], {2: old}))
    assert 2 in proc.protection.rows and proc.history[2] == old
    # reused by an unprotected request: nothing of the old one is left, its logits are untouched
    assert proc.add_request(2, params(0.0)) is False
    assert 2 not in proc.args and 2 not in proc.history and 2 not in proc.protection.rows
    assert 2 not in proc.protection.engines["math"].cache.rows, "the old occupant's proxy KV is released"
    unprotected = torch.randn(1, VOCAB)
    assert torch.equal(proc.apply(unprotected.clone(), context([2], {2: [70, 71]})), unprotected)
    # reused by a protected request of another profile: Δ of the new tokens only, with its own λ
    assert proc.add_request(2, params(3.0, "code")) is True
    new = [80, 81, 82]
    commit(state, 2, new)
    logits = torch.zeros(1, VOCAB)
    proc.apply(logits, context([2], {2: new}))
    assert proc.history[2] == new
    assert protected_as(models, logits[0], torch.zeros(VOCAB), 3.0, "code", new, atol=5e-3)


def test_v2_absent_slots_give_way_when_the_pool_is_full(make_runner, models):
    """Kept state never costs a present row its protection: a full pool releases absent slots first."""
    proc, state = make_runner(token_budget=64)  # 4 blocks of 16
    long, new = list(range(10, 50)), list(range(100, 130))  # 3 blocks; then 2 blocks
    proc.add_request(1, params(2.0))
    commit(state, 1, long)
    proc.apply(torch.zeros(1, VOCAB), context([1], {1: long}))
    assert proc.protection.engines["math"].cache.free_blocks == 1
    proc.add_request(5, params(2.0))
    commit(state, 5, new)
    logits = torch.zeros(1, VOCAB)
    proc.apply(logits, context([5], {5: new}))
    assert 1 not in proc.protection.rows and 1 not in proc.history, "the absent slot was released"
    assert proc.protection.rows[5].refused is None
    assert protected_as(models, logits[0], torch.zeros(VOCAB), 2.0, "math", new)
    # the released slot comes back: re-prefilled from the device history, protected again
    long.append(50)
    commit(state, 1, long)
    logits = torch.zeros(1, VOCAB)
    proc.apply(logits, context([1], {1: long}))
    assert 1 in proc.protection.rows and 5 not in proc.protection.rows
    assert protected_as(models, logits[0], torch.zeros(VOCAB), 2.0, "math", long)


def test_v2_refuses_speculative_decoding_at_start_up(make_runner):
    with pytest.raises(ValueError, match="speculative decoding") as exc:
        make_runner(speculative_config=SimpleNamespace(method="ngram", num_speculative_tokens=2))
    assert str(exc.value) == SPEC_DECODE_REFUSED and "\n" not in SPEC_DECODE_REFUSED


def test_v2_rows_it_cannot_map_are_withheld_not_served_raw(runner):
    """More logits rows than requests (a draft layout, refused at start-up): a protected slot's
    rows are withheld (uniform where the sampler still allows tokens), the others untouched."""
    proc, _ = runner
    proc.add_request(3, params(2.0))
    proc.add_request(4, params(0.0))
    owners = [3, 3, 3, 4, 4]
    logits = torch.randn(len(owners), VOCAB)
    logits[1, 7] = float("-inf")
    base = logits.clone()
    ctx = LogitsContext(
        expanded_idx_mapping=torch.tensor(owners),
        idx_mapping=torch.tensor([3, 4]),
        idx_mapping_np=np.array([3, 4]),
        expanded_local_pos=torch.tensor([0, 1, 2, 0, 1]),
        input_ids=torch.tensor([5, 6, 7, 8, 9]),
        pos=torch.tensor([4, 5, 6, 2, 3]),
        seq_lens_upper_bound_np=np.array([7, 4]),
    )
    out = proc.apply(logits, ctx)
    assert torch.equal(out[0], torch.zeros(VOCAB)) and torch.equal(out[2], torch.zeros(VOCAB))
    assert out[1, 7] == float("-inf") and torch.equal(out[1, :7], torch.zeros(7))
    assert torch.equal(out[3:], base[3:])


def test_v2_validate_params_rejects_bad_lambda(runner):
    with pytest.raises(ValueError, match="ad_lambda"):
        AntidistillationLogitsProcessorV2.validate_params(params(-1.0))
