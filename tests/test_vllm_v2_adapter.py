"""The EXPERIMENTAL V2-runner adapter against vLLM's real V2 interface objects (LogitsContext,
LogitsProcRequestState). The V2 runner itself needs CUDA; its token buffers are replaced here by
CPU tensors with the same attributes (``.gpu``, ``.np``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from antidistill.benchmarks.tiny.serving import EPSILONS, build_models
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.delta import finite_difference
from antidistill.proxy_worker.core.model import StackedProxy
from antidistill.proxy_worker.core.plan import build_plan
from antidistill.proxy_worker.core.weights import perturbed_copies, stack_copies
from antidistill.proxy_worker.runtime.vllm_v2 import AntidistillationLogitsProcessorV2
from vllm import SamplingParams
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

MAX_REQS, MAX_LEN = 8, 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("v2-models"))


def buffer(shape):
    t = torch.zeros(shape, dtype=torch.int64)
    return SimpleNamespace(gpu=t, cpu=t, np=t.numpy())


@pytest.fixture()
def runner(models, monkeypatch):
    """A processor built the way the V2 runner builds it, plus the buffers the runner would own."""
    cfg = SimpleNamespace(
        additional_config={"antidistillation": models.settings()},
        model_config=SimpleNamespace(tokenizer=str(models.teacher), get_vocab_size=lambda: 400, max_model_len=MAX_LEN),
        cache_config=SimpleNamespace(block_size=16, num_gpu_blocks_override=None),
        scheduler_config=SimpleNamespace(
            max_num_seqs=MAX_REQS, max_num_batched_tokens=256, long_prefill_token_threshold=0
        ),
        speculative_config=None,
    )
    monkeypatch.setenv("ANTIDISTILL_CONFIG", json.dumps({"antidistillation": models.settings()}))
    state = LogitsProcRequestState(
        device=torch.device("cpu"),
        max_num_reqs=MAX_REQS,
        vocab_size=400,
        all_token_ids=buffer((MAX_REQS, MAX_LEN)),
        prompt_len=buffer(MAX_REQS),
        prefill_len=buffer(MAX_REQS),
        total_len=buffer(MAX_REQS),
    )
    return AntidistillationLogitsProcessorV2(cfg, state), state


def reference_delta(models, profile, tokens):
    cfg = load_config(models.proxy)
    theta, grad = models.theta_and_grad(profile)
    eps = EPSILONS[profile]
    model = StackedProxy(cfg, stack_copies(perturbed_copies(theta, grad, (eps, -eps)), cfg, torch.float32))
    return finite_difference(model.logits(build_plan([tokens], [0])), eps)[0]


def context(slots, histories):
    """The step layout the V2 runner passes: batch position → slot, and each row's newest token."""
    lengths = [len(histories[s]) for s in slots]
    return LogitsContext(
        expanded_idx_mapping=torch.tensor(slots),
        idx_mapping=torch.tensor(slots),
        idx_mapping_np=np.array(slots),
        expanded_local_pos=torch.zeros(len(slots), dtype=torch.long),
        input_ids=torch.tensor([histories[s][-1] for s in slots]),
        pos=torch.tensor([n - 1 for n in lengths]),
        seq_lens_upper_bound_np=np.array(lengths),
    )


def commit(state, slot, tokens):
    """What the runner does: committed tokens on device (all but the newest, which is in input_ids)."""
    state.all_token_ids.gpu[slot, : len(tokens) - 1] = torch.tensor(tokens[:-1])


def params(lam, profile="math"):
    return SamplingParams(extra_args={"ad_lambda": lam, "ad_profile": profile})


def test_v2_adapter_follows_slots_reorders_and_reuse(runner, models):
    proc, state = runner
    histories = {2: [5, 6, 7, 8], 5: [9, 10], 0: [11, 12, 13]}
    assert proc.add_request(2, params(2.0)) is True
    assert proc.add_request(5, params(0.0)) is False, "λ = 0 declines the row"
    assert proc.add_request(0, params(1.0, "code")) is True
    lams = {2: (2.0, "math"), 0: (1.0, "code")}
    rng = torch.Generator().manual_seed(0)
    for step, order in enumerate([[2, 5, 0], [0, 2, 5], [5, 0, 2]]):
        for s in histories:
            commit(state, s, histories[s])
        logits = torch.randn(len(order), 400, generator=rng)
        base = logits.clone()
        out = proc.apply(logits, context(order, histories))
        for row, slot in enumerate(order):
            if slot in lams:
                lam, profile = lams[slot]
                expected = base[row].clone()
                expected[:320] += lam * reference_delta(models, profile, histories[slot])
                # fp32 round-off of cached vs full passes, amplified by 1/(2ε)
                assert torch.allclose(out[row], expected, atol=1e-2, rtol=1e-3), (step, slot)
            else:
                assert torch.equal(out[row], base[row])
        for s in histories:
            histories[s].append(100 + step)
    # slot 2 finishes (absent from the step): its proxy KV is released; slot 2 is then reused
    proc.apply(torch.zeros(2, 400), context([0, 5], histories))
    assert 2 not in proc.protection.rows
    assert proc.add_request(2, params(3.0)) is True
    histories[2] = [40, 41, 42]
    commit(state, 2, histories[2])
    logits = torch.zeros(1, 400)
    proc.apply(logits, context([2], histories))
    assert torch.allclose(logits[0, :320], 3.0 * reference_delta(models, "math", [40, 41, 42]), atol=5e-3, rtol=1e-3)


def test_v2_validate_params_rejects_bad_lambda(runner):
    with pytest.raises(ValueError, match="ad_lambda"):
        AntidistillationLogitsProcessorV2.validate_params(params(-1.0))
