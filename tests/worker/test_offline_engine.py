"""The offline engine (the evaluation's and ``antidistill tune``'s sampler) runs the real processor:
a completion whose Δ failed never passes as protected (one injected non-finite Δ fails the whole
call), and its teacher scores are the unprotected teacher's own log-probabilities."""

from __future__ import annotations

import json
import os

import pytest
import torch
from antidistill.benchmarks.tiny.models import load_hf
from antidistill.benchmarks.tiny.serving import build_models
from antidistill.proxy_worker.runtime import failure_ledger, offline

from tests import fault_injection
from tests.helpers import engine_fixture


def test_check_protected_passes_an_empty_ledger_and_names_failures(tmp_path):
    ledger = failure_ledger.FailureLedger(failure_ledger.create(tmp_path / "ledger", records=4))
    offline.check_protected(ledger.read())
    ledger.append(7, failure_ledger.Reason.NON_FINITE)
    ledger.append(7, failure_ledger.Reason.NON_FINITE)
    ledger.append(9, failure_ledger.Reason.BUDGET)
    with pytest.raises(
        offline.ProtectionFailed, match=r"^2 protected trace requests lost their Δ \(1 budget, 2 non_finite\)"
    ):
        offline.check_protected(ledger.read())
    for ticket in range(6):  # more than the ring holds: unknown losses are losses too
        ledger.append(ticket + 1, failure_ledger.Reason.ERROR)
    with pytest.raises(offline.ProtectionFailed):
        offline.check_protected(ledger.read())


ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "max_num_seqs": 4}


@engine_fixture(scope="module")
def faulty_engine(tmp_path_factory):
    """One offline engine whose processor reports a non-finite Δ for rows whose prompt starts with
    the token of ``bad``; yields (models, engine, bad prompt, good prompt)."""
    models = build_models(tmp_path_factory.mktemp("offline-engine"))
    tok = models.tokenizer
    bad, good = tok("Alice has 3 apples")["input_ids"], tok("The sum of 12")["input_ids"]
    assert bad[0] != good[0]
    saved = os.environ.get(fault_injection.ENV_VAR)
    os.environ[fault_injection.ENV_VAR] = json.dumps({"nan_token": bad[0]})
    try:
        with offline.offline_engine(
            models.teacher,
            models.settings(),
            seed=0,
            engine_args=ENGINE_ARGS,
            processor="tests.fault_injection:FaultyProcessor",
        ) as engine:
            yield models, engine, bad, good
    finally:
        if saved is None:
            os.environ.pop(fault_injection.ENV_VAR)
        else:
            os.environ[fault_injection.ENV_VAR] = saved


def test_a_lost_delta_fails_the_call_instead_of_passing_as_protected(faulty_engine):
    _, engine, bad, good = faulty_engine
    requests = [
        offline.TraceRequest(good, 0.8, lam=1.0, seed=1),
        offline.TraceRequest(bad, 0.8, lam=1.0, seed=2),
        offline.TraceRequest(bad, 0.8, lam=0.0, seed=3),  # unprotected: no Δ asked, none lost
    ]
    with pytest.raises(offline.ProtectionFailed) as err:
        engine.generate(requests, top_p=1.0, max_tokens=8)
    assert str(err.value).startswith("1 protected trace requests lost their Δ (")
    assert "non_finite" in str(err.value)
    clean = engine.generate(
        [offline.TraceRequest(good, 0.0), offline.TraceRequest(good, 0.8, lam=1.0, seed=1)], top_p=1.0, max_tokens=8
    )
    assert len(clean) == 2 and all(len(c.token_ids) == 8 for c in clean), "the next call starts from a clean ledger"


def test_token_logprobs_are_the_unprotected_teachers_own(faulty_engine):
    """The scores of a protected completion, recomputed by the HF teacher (no processor): the same
    log-probabilities, token for token."""
    models, engine, _, good = faulty_engine
    [completion] = engine.generate([offline.TraceRequest(good, 0.0, lam=2.0)], top_p=1.0, max_tokens=12)
    [scored] = engine.token_logprobs([good], [completion.token_ids])
    teacher = load_hf(models.teacher)
    with torch.no_grad():
        ids = torch.tensor([[*good, *completion.token_ids]])
        logp = torch.log_softmax(teacher(ids).logits[0].double(), dim=-1)
    expected = [float(logp[len(good) - 1 + j, t]) for j, t in enumerate(completion.token_ids)]
    assert len(scored) == len(completion.token_ids) == 12
    assert scored == pytest.approx(expected, abs=1e-3)
