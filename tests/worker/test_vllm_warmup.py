"""The V2 adapter through vLLM 0.33's sampler warm-up (docs/vllm-compat.md), before any request.

0.33's ``GPUModelRunner._dummy_sampler_run`` (profile run, GPU only) calls every processor's
``add_request`` for each dummy slot with ``SamplingParams.for_sampler_warmup()`` (no
``extra_args``), then ``apply_staged_writes`` and the sampler on an ``InputBatch.make_dummy`` batch;
``warmup_kernels`` then runs requests with the same parameters (``SamplingParams(temperature=0)``
under speculative decoding) through prefill and decode. The slots are never removed: the next
requests get them through ``add_request``. The batch here is vLLM's own ``make_dummy``, read the
way ``Sampler.__call__`` reads it."""

from __future__ import annotations

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

from tests.worker import v2_runner
from tests.worker.v2_runner import (
    MAX_REQS,
    VOCAB,
    assert_steps,
    commit,
    context,
    params,
)

# the V2 runner fixtures (tests/worker/v2_runner.py): the same tiny models and processor factory
make_runner = v2_runner.make_runner
models = v2_runner.models

WARMUP_PARAMS = {
    "sampler": SamplingParams.for_sampler_warmup,
    "greedy": lambda: SamplingParams(temperature=0),
}


def dummy_context(num_reqs: int) -> LogitsContext:
    """The context ``Sampler.apply_sampling_params`` builds from ``InputBatch.make_dummy``."""
    batch = InputBatch.make_dummy(num_reqs, num_reqs, InputBuffers(MAX_REQS, MAX_REQS, torch.device("cpu")))
    return LogitsContext(
        expanded_idx_mapping=batch.expanded_idx_mapping,
        idx_mapping=batch.idx_mapping,
        idx_mapping_np=batch.idx_mapping_np,
        expanded_local_pos=batch.expanded_local_pos,
        input_ids=batch.input_ids[batch.logits_indices],
        pos=batch.positions[batch.logits_indices],
        seq_lens_upper_bound_np=batch.seq_lens_cpu_upper_bound.numpy(),
    )


def profile_warmup(proc, make_params) -> tuple[list[bool], torch.Tensor, torch.Tensor]:
    """``_dummy_sampler_run``'s warm-up-param pass over every slot: claims, logits in, logits out."""
    claims = [proc.add_request(slot, make_params()) for slot in range(MAX_REQS)]
    proc.apply_staged_writes()
    logits = torch.randn(MAX_REQS, VOCAB, generator=torch.Generator().manual_seed(1))
    base = logits.clone()
    return claims, base, proc.apply(logits, dummy_context(MAX_REQS))


def kernel_warmup(proc, state, make_params, slots) -> None:
    """``warmup_kernels``: requests of a 2-token prompt, a prefill then 3 decode steps, untouched."""
    histories = {slot: [0, 1] for slot in slots}
    for slot in slots:
        assert proc.add_request(slot, make_params()) is False
    for step in range(4):
        for slot in slots:
            commit(state, slot, histories[slot])
        logits = torch.randn(len(slots), VOCAB)
        base = logits.clone()
        assert torch.equal(proc.apply(logits, context(slots, histories)), base), step
        for slot in slots:
            histories[slot].append(2 + step)


@pytest.mark.parametrize("kind", WARMUP_PARAMS)
def test_v2_warmup_slots_without_extra_args_are_declined_and_untouched(make_runner, kind):
    proc, state = make_runner()
    assert WARMUP_PARAMS[kind]().extra_args is None, "the premise: warm-up parameters carry no vllm_xargs"
    claims, base, out = profile_warmup(proc, WARMUP_PARAMS[kind])
    assert claims == [False] * MAX_REQS, "λ = 0 for every dummy slot"
    assert torch.equal(out, base)
    assert not proc.args and not proc.history and not proc.protection.rows
    kernel_warmup(proc, state, WARMUP_PARAMS[kind], list(range(MAX_REQS)))
    assert not proc.args and not proc.history and not proc.protection.rows


def test_v2_requests_after_warmup_get_their_delta(make_runner, models):
    """Protected requests on slots the warm-up left behind get λ·Δ of their own tokens only; a slot
    still holding a warm-up occupant and a request without vllm_xargs keep their logits."""
    proc, state = make_runner()
    profile_warmup(proc, SamplingParams.for_sampler_warmup)
    kernel_warmup(proc, state, SamplingParams.for_sampler_warmup, [0, 3, 6])
    assert proc.add_request(0, params(2.0)) is True
    assert proc.add_request(3, params(1.0, "code")) is True
    assert proc.add_request(1, SamplingParams()) is False
    lams = {0: (2.0, "math"), 3: (1.0, "code")}
    histories = {0: [5, 6, 7, 8], 3: [9, 10, 11], 1: [12, 13], 6: [0, 1, 2, 3, 4, 5]}
    assert_steps(models, proc, state, histories, lams, [[0, 1, 3, 6], [6, 3, 0, 1]])
