"""The evaluation's traces come from the real processor in an offline vLLM engine, and a trace whose
Δ failed never passes as protected: one injected non-finite Δ fails the whole traces call."""

from __future__ import annotations

import json
import os

import pytest
from antidistill.benchmarks.distillation import sampling
from antidistill.benchmarks.tiny.serving import build_models
from antidistill.proxy_worker.runtime import failure_ledger

from tests import fault_injection
from tests.helpers import engine_fixture


def test_check_protected_passes_an_empty_ledger_and_names_failures(tmp_path):
    ledger = failure_ledger.FailureLedger(failure_ledger.create(tmp_path / "ledger", records=4))
    sampling.check_protected(ledger.read())
    ledger.append(7, failure_ledger.Reason.NON_FINITE)
    ledger.append(7, failure_ledger.Reason.NON_FINITE)
    ledger.append(9, failure_ledger.Reason.BUDGET)
    with pytest.raises(
        sampling.ProtectionFailed, match=r"^2 protected trace requests lost their Δ \(1 budget, 2 non_finite\)"
    ):
        sampling.check_protected(ledger.read())
    for ticket in range(6):  # more than the ring holds: unknown losses are losses too
        ledger.append(ticket + 1, failure_ledger.Reason.ERROR)
    with pytest.raises(sampling.ProtectionFailed):
        sampling.check_protected(ledger.read())


@engine_fixture(scope="module")
def faulty_traces(tmp_path_factory):
    """One offline engine whose processor reports a non-finite Δ for rows whose prompt starts with
    the first protected prompt's first token; the outcome of ``sampling.generate`` (texts or error)."""
    models = build_models(tmp_path_factory.mktemp("eval-sampling"))
    tok = models.tokenizer
    bad, good = tok("Alice has 3 apples")["input_ids"], tok("The sum of 12")["input_ids"]
    assert bad[0] != good[0]
    requests = [
        sampling.TraceRequest(good, 0.8, lam=1.0, seed=1),
        sampling.TraceRequest(bad, 0.8, lam=1.0, seed=2),
        sampling.TraceRequest(bad, 0.8, lam=0.0, seed=3),  # unprotected: no Δ asked, none lost
    ]
    saved = os.environ.get(fault_injection.ENV_VAR)
    os.environ[fault_injection.ENV_VAR] = json.dumps({"nan_token": bad[0]})
    try:
        sampling.generate(
            models.teacher,
            models.settings(),
            requests,
            top_p=1.0,
            max_tokens=8,
            seed=0,
            engine_args={"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "max_num_seqs": 4},
            processor="tests.fault_injection:FaultyProcessor",
        )
    except sampling.ProtectionFailed as exc:
        return exc
    finally:
        if saved is None:
            os.environ.pop(fault_injection.ENV_VAR)
        else:
            os.environ[fault_injection.ENV_VAR] = saved
    return None


def test_a_lost_delta_fails_the_traces_instead_of_passing_as_protected(faulty_traces):
    assert isinstance(faulty_traces, sampling.ProtectionFailed), "the withheld trace was returned as protected"
    assert str(faulty_traces).startswith("1 protected trace requests lost their Δ (")
    assert "non_finite" in str(faulty_traces)
