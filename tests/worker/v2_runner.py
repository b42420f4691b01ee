"""The V2 runner's side of the adapter tests, shared by the adapter and 0.33-warm-up tests: the tiny
models, a processor built the way the V2 runner builds it with CPU stand-ins for its token buffers
(``.gpu``, ``.np``), the step layout it passes, and the check that a row got exactly λ·Δ."""

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

MAX_REQS, MAX_LEN, VOCAB, PROXY_VOCAB = 8, 64, 400, 320


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("v2-models"))


def buffer(shape):
    t = torch.zeros(shape, dtype=torch.int64)
    return SimpleNamespace(gpu=t, cpu=t, np=t.numpy())


@pytest.fixture()
def make_runner(models, monkeypatch):
    """Factory: a processor built the way the V2 runner builds it, plus the buffers the runner owns."""

    def make(speculative_config=None, **overrides):
        settings = models.settings(**overrides)
        cfg = SimpleNamespace(
            additional_config={"antidistillation": settings},
            model_config=SimpleNamespace(
                tokenizer=str(models.teacher), get_vocab_size=lambda: VOCAB, max_model_len=MAX_LEN
            ),
            cache_config=SimpleNamespace(block_size=16, num_gpu_blocks_override=None),
            scheduler_config=SimpleNamespace(
                max_num_seqs=MAX_REQS, max_num_batched_tokens=256, long_prefill_token_threshold=0
            ),
            speculative_config=speculative_config,
        )
        monkeypatch.setenv("ANTIDISTILL_CONFIG", json.dumps({"antidistillation": settings}))
        state = LogitsProcRequestState(
            device=torch.device("cpu"),
            max_num_reqs=MAX_REQS,
            vocab_size=VOCAB,
            all_token_ids=buffer((MAX_REQS, MAX_LEN)),
            prompt_len=buffer(MAX_REQS),
            prefill_len=buffer(MAX_REQS),
            total_len=buffer(MAX_REQS),
        )
        return AntidistillationLogitsProcessorV2(cfg, state), state

    return make


@pytest.fixture()
def runner(make_runner):
    return make_runner()


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


def params(lam, profile="math", **extra):
    return SamplingParams(extra_args={"ad_lambda": lam, "ad_profile": profile, **extra})


LOGIT_ROUNDOFF = 1e-5
"""How far a cached pass's fp32 logits may sit from a full pass's (≈ 1 ulp at |logit| ≈ 64): Δ is a
difference of two logits over 2ε, so λ·Δ may differ by about λ · 2 · this / (2ε)."""


def protected_as(models, out_row, base_row, lam, profile, tokens, atol=None):
    """``out_row`` is ``base_row + λ·Δ(tokens)``, up to fp32 round-off of cached vs full passes
    amplified by λ/ε (λ·Δ itself is of order 1–20 here, so an unprotected row is far outside it)."""
    expected = base_row.clone()
    expected[:PROXY_VOCAB] += lam * reference_delta(models, profile, tokens)
    atol = lam * LOGIT_ROUNDOFF / EPSILONS[profile] if atol is None else atol
    return torch.allclose(out_row, expected, atol=atol, rtol=1e-3)


def assert_steps(models, proc, state, histories, lams, orders) -> None:
    """Run one step per layout in ``orders`` (batch position → slot), every history growing by a
    token per step: each slot in ``lams`` (slot → (λ, profile)) gets exactly λ·Δ of its own tokens,
    every other row keeps its logits."""
    rng = torch.Generator().manual_seed(0)
    for step, order in enumerate(orders):
        for slot in histories:
            commit(state, slot, histories[slot])
        logits = torch.randn(len(order), VOCAB, generator=rng)
        base = logits.clone()
        out = proc.apply(logits, context(order, histories))
        for row, slot in enumerate(order):
            if slot in lams:
                assert protected_as(models, out[row], base[row], *lams[slot], histories[slot]), (step, slot)
            else:
                assert torch.equal(out[row], base[row]), (step, slot)
        for slot in histories:
            histories[slot].append(100 + step)
