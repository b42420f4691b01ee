"""Δ: finite differences vs forward-mode JVP vs an independent reverse-mode directional derivative
through the HF model; the permutation control; padding and non-finite handling."""

from __future__ import annotations

import torch
from antidistill.benchmarks.tiny.models import load_hf
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.delta import (
    PermutationControl,
    add_scaled,
    exact_delta,
    finite_difference,
    pad_to_width,
    zero_non_finite_,
)
from antidistill.proxy_worker.core.model import StackedProxy
from antidistill.proxy_worker.core.plan import build_plan
from antidistill.proxy_worker.core.rope import RotaryTable
from antidistill.proxy_worker.core.weights import load_proxy_state, perturbed_copies, stack_copies

IDS = [4, 80, 17, 250, 9, 33, 61, 2, 7, 140, 11]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def autograd_directional(path, theta, grad, ids) -> torch.Tensor:
    """d/dt log_softmax(HF(θ + t g)) at t = 0 by reverse-mode double-backward (not forward AD)."""
    hf = load_hf(path, torch.float64)
    theta64 = {k: v.double() for k, v in theta.items()}
    g64 = {k: v.double() for k, v in grad.items()}

    def f(t: torch.Tensor) -> torch.Tensor:
        params = {k: theta64[k] + t * g64[k] for k in theta64}
        out = torch.func.functional_call(hf, params, (torch.tensor([ids]),))
        return torch.log_softmax(out.logits[0, -1], dim=-1)

    zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
    return torch.autograd.functional.jvp(f, zero, one)[1]


def test_finite_difference_jvp_and_autograd_agree(model_dir):
    path = model_dir("qwen3")
    cfg = load_config(path)
    theta = load_proxy_state(path, cfg)
    gen = torch.Generator().manual_seed(0)
    grad = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in theta.items()}
    plan = build_plan([IDS], [0])

    eps = 1e-5
    fd_model = StackedProxy(cfg, stack_copies(perturbed_copies(theta, grad, (eps, -eps)), cfg, torch.float64))
    fd = finite_difference(fd_model.logits(plan), eps)[0]
    theta1 = stack_copies([theta], cfg, torch.float64)
    grad1 = stack_copies([grad], cfg, torch.float64)
    exact = exact_delta(theta1, grad1, cfg, RotaryTable(cfg), plan)[0]
    auto = autograd_directional(path, theta, grad, IDS)

    assert exact.abs().max() > 1e-3, "a zero Δ would make the comparison vacuous"
    assert cosine(fd, exact) >= 0.9999
    assert cosine(exact, auto) >= 0.9999
    assert cosine(fd, auto) >= 0.9999
    # same scale too (cosine ignores it); RoPE tables are fp32 in both, hence not 1e-12
    assert torch.allclose(exact, auto, rtol=1e-3, atol=1e-4)


def test_finite_difference_sign_convention():
    # copy 0 is θ+εg: a token whose log-prob rises along +g gets a positive Δ
    plus = torch.tensor([[[2.0, 0.0, 0.0]]])
    minus = torch.tensor([[[0.0, 0.0, 0.0]]])
    delta = finite_difference(torch.cat([plus, minus]), 0.5)[0]
    assert delta[0] > 0 > delta[1]


def test_permutation_control_keeps_values_destroys_direction():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(6, 1000, generator=gen)
    ctl = PermutationControl(1000, seed=7)
    keys = [11, 12, 13, 14, 15, 16]
    out = ctl.apply(delta, keys)
    signs = ctl.signs(keys)
    for row in range(6):
        assert torch.equal(out[row].abs().sort().values, delta[row].abs().sort().values)
        assert torch.equal(out[row], signs[row] * delta[row][ctl.permutation])
        assert abs(cosine(out[row], delta[row])) < 0.2
    assert torch.equal(ctl.apply(delta, keys), out), "same seed and keys → same control"
    many = PermutationControl(1000, seed=7).signs(range(200))
    assert 40 < int((many > 0).sum()) < 160, "signs are random per row, not constant"
    assert not torch.equal(PermutationControl(1000, seed=8).permutation, ctl.permutation)


def test_pad_to_width_and_add_scaled():
    delta = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    padded = pad_to_width(delta, 4)
    assert padded.shape == (2, 4) and torch.equal(padded[:, 2:], torch.zeros(2, 2))
    logits = torch.zeros(3, 4)
    add_scaled(logits, torch.tensor([0, 2]), torch.tensor([2.0, -1.0]), delta)
    assert torch.equal(logits[0], torch.tensor([2.0, -4.0, 0.0, 0.0]))
    assert torch.equal(logits[1], torch.zeros(4))
    assert torch.equal(logits[2], torch.tensor([-0.5, -0.5, 0.0, 0.0]))


def test_non_finite_rows_fall_back_to_zero():
    delta = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [float("inf"), 0.0]])
    fixed, bad = zero_non_finite_(delta.clone())
    assert bad.tolist() == [False, True, True]
    assert torch.equal(fixed[0], delta[0]) and torch.equal(fixed[1:], torch.zeros(2, 2))
    same, _ = zero_non_finite_(delta)
    assert same.data_ptr() == delta.data_ptr() and torch.equal(delta, fixed)  # in place: no copy per step
