"""The protection dose (proxy_worker/tools/dose.py) against an independent reading of its definition:
d/dε of the completion's log-likelihood under HF proxies at θ ± εg, per token, over s. And the
property it exists to show: greedy decoding at λ > 0 writes traces with a higher dose than at λ = 0."""

from __future__ import annotations

import pytest
import torch
from antidistill.benchmarks.tiny.reference import ReferenceSampler
from antidistill.benchmarks.tiny.serving import EPSILONS, build_models
from antidistill.proxy_worker.core.gradient_file import read_delta_scale
from antidistill.proxy_worker.tools.dose import DoseMeter
from antidistill.proxy_worker.tools.traces import TokenizedTrace


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_models(tmp_path_factory.mktemp("dose-models"))


@pytest.fixture(scope="module")
def setup(models):
    scale = read_delta_scale(models.gradients["math"])
    theta, grad = models.theta_and_grad("math")
    meter = DoseMeter.from_files(models.proxy, models.gradients["math"], scale)
    return meter, ReferenceSampler(models.teacher, models.proxy, theta, grad, EPSILONS["math"]), scale


@torch.no_grad()
def likelihood_slope(sampler: ReferenceSampler, trace: TokenizedTrace) -> float:
    """[log p(completion; θ+εg) − log p(completion; θ−εg)] / 2ε per completion token, by HF."""
    x = torch.tensor([trace.ids])
    logs = []
    for proxy in sampler.proxies:
        logp = torch.log_softmax(proxy(x).logits[0].double(), -1)
        logs.append(sum(float(logp[t - 1, trace.ids[t]]) for t in range(trace.prompt_len, len(trace.ids))))
    return (logs[0] - logs[1]) / (2 * sampler.epsilon) / trace.completion_tokens


def test_dose_is_the_slope_of_the_traces_likelihood_along_g(models, setup):
    meter, sampler, scale = setup
    prompt = models.tokenizer("Question 7: Alice has 7 apples and buys 15 more, so")["input_ids"]
    for lam in (0.0, 3.0):
        trace = TokenizedTrace(prompt + sampler.generate(prompt, lam, 12), len(prompt))
        expected = likelihood_slope(sampler, trace) / scale
        assert meter.dose(trace) == pytest.approx(expected, rel=2e-2, abs=1e-4), lam
    assert meter.dose(TokenizedTrace(prompt, len(prompt))) is None, "no completion, no dose"


def test_antidistillation_raises_the_dose(models, setup):
    meter, sampler, _ = setup
    texts = [f"Question {i}: Alice has {i} apples and buys {2 * i + 1} more, so" for i in range(4)]
    prompts = [models.tokenizer(t)["input_ids"] for t in texts]

    def dose_at(lam: float) -> float:
        return meter.mean_dose([TokenizedTrace(p + sampler.generate(p, lam, 12), len(p)) for p in prompts])

    plain, protected = dose_at(0.0), dose_at(3.0)
    assert protected > plain, (plain, protected)
