"""Δ modes (full, head, last:K) against independent references built on the HF model.

The references never use the project's forward pass: θ ± ε·g_mode is applied by hand to an fp64 HF
model whose head is untied (so a restricted g moves the head, never the input embedding), and Δ is
the central difference of its log-softmax; for ``head`` also the closed form (G h)_v − Σ_u p_u (G h)_u.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from antidistill.benchmarks.tiny.models import load_hf
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.delta_mode import DeltaMode
from antidistill.proxy_worker.core.gradient_file import DELTA_MODE_KEY, load_gradient, read_metadata
from antidistill.proxy_worker.core.model import StackedProxy
from antidistill.proxy_worker.core.weights import WeightsError, gradient_shapes, load_proxy_state, stack_perturbed
from antidistill.proxy_worker.runtime.engine import ProxyEngine
from antidistill.proxy_worker.runtime.protection import Protection
from antidistill.proxy_worker.runtime.settings import RequestArgs, SettingsError, parse_settings
from antidistill.proxy_worker.tools import gradient
from antidistill.proxy_worker.tools.traces import tokenize_trace
from torch.func import functional_call, jvp

from tests.worker.test_gradient import TRACES, reference_gradient, relative_error

pytestmark = pytest.mark.unit
LAYERS = 3
MODES = ["full", "head", "last:1", "last:2"]


def untied_hf(path, dtype=torch.float64):
    """The HF model with its own head parameter (a copy of the embedding when tied)."""
    model = load_hf(path, dtype)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def hf_gradient(path, tokenizer, mode: DeltaMode):
    """ℓ (mean of per-trace mean completion NLL) differentiated by plain autograd on the untied HF
    model, kept on the parameters ``mode`` covers."""
    model = untied_hf(path, torch.float32)
    losses = []
    for rec in TRACES:
        t = tokenize_trace(tokenizer, rec)
        ids = torch.tensor([t.ids])
        losses.append(F.cross_entropy(model(ids).logits[0, t.prompt_len - 1 : -1], ids[0, t.prompt_len :]))
    torch.stack(losses).mean().backward()
    covered = gradient_shapes(load_config(path), mode)
    return {name: p.grad for name, p in model.named_parameters() if name in covered}


def hf_delta(path, grad, tokens):
    """Exact Δ at every position of ``tokens``: forward-mode AD (``torch.func.jvp``) of the fp64 HF
    model's log-softmax along g (the HF model stays tied for a full g, which moves the tied tensor)."""
    model = untied_hf(path) if "lm_head.weight" in grad else load_hf(path, torch.float64)
    params = {name: p.detach() for name, p in model.named_parameters()}
    tangents = {name: grad[name].double() if name in grad else torch.zeros_like(p) for name, p in params.items()}
    ids = torch.tensor([tokens])

    def logprobs(theta):
        return torch.log_softmax(functional_call(model, theta, (ids,)).logits[0], dim=-1)

    return jvp(logprobs, (params,), (tangents,))[1]


@pytest.fixture(scope="module")
def proxy(model_dir):
    return model_dir("llama", tie=True, layers=LAYERS)


@pytest.fixture(scope="module")
def grads(proxy, tokenizer, tmp_path_factory):
    """One gradient file per mode, written by the real gradient tool."""
    root = tmp_path_factory.mktemp("mode-grads")
    return {
        mode: gradient.build_gradient_file(
            proxy,
            TRACES,
            root / f"{mode.replace(':', '')}.safetensors",
            tokenizer=tokenizer,
            mode=DeltaMode.parse(mode),
        ).path
        for mode in MODES
    }


def test_mode_names_parse_and_say_which_layers_run_twice():
    assert str(DeltaMode.parse(None)) == "full" and not DeltaMode.parse("full").restricted
    assert DeltaMode.parse("last:3") == DeltaMode("last", 3) and str(DeltaMode("last", 3)) == "last:3"
    assert DeltaMode.parse("head").layer_copies(4) == [1, 1, 1, 1]
    assert DeltaMode.parse("last:1").layer_copies(4) == [1, 1, 1, 2]
    assert DeltaMode.parse("full").layer_copies(4) == [2, 2, 2, 2]
    for bad in ("last", "last:0", "last:-1", "tail:2", "Head", ""):
        with pytest.raises(ValueError, match="unknown Δ mode"):
            DeltaMode.parse(bad)
    with pytest.raises(ValueError, match="needs 5 blocks"):
        DeltaMode.parse("last:5").layer_copies(4)


@pytest.mark.parametrize("mode", MODES)
def test_the_gradient_of_each_mode_matches_autograd_on_the_untied_model(proxy, tokenizer, grads, mode):
    """A restricted g is the untied model's gradient on the parameters the mode covers (the head's
    own, not the tied tensor's two uses together); ``full`` stays the tied model's whole gradient."""
    cfg = load_config(proxy)
    grad = load_gradient(grads[mode], cfg)
    assert read_metadata(grads[mode])[DELTA_MODE_KEY] == mode
    if mode == "full":
        ref, _ = reference_gradient(proxy, tokenizer, TRACES)
    else:
        ref = hf_gradient(proxy, tokenizer, DeltaMode.parse(mode))
    assert set(grad) == set(ref) == set(gradient_shapes(cfg, DeltaMode.parse(mode)))
    assert relative_error(grad, ref) <= 1e-5
    if mode != "full":
        assert "model.embed_tokens.weight" not in grad and "lm_head.weight" in grad


def engine_for(proxy, path, eps=1e-4, dtype=torch.float64, budget=512):
    """A ProxyEngine on θ ± ε·g from ``path``, built as the server builds it, in ``dtype``."""
    cfg = load_config(proxy)
    params = stack_perturbed(load_proxy_state(proxy, cfg), load_gradient(path, cfg), (eps, -eps), cfg, dtype)
    return ProxyEngine(StackedProxy(cfg, params), eps, budget, block_size=4)


ROWS = {0: [5, 9, 17, 33, 41, 8, 12], 1: [5, 9, 17, 33, 60], 2: [70, 71, 72, 73, 74, 75, 76, 77, 78]}


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_serves_the_reference_delta_in_a_busy_batch(proxy, grads, mode):
    """Rows of different lengths (two sharing a prefix) through a prefill and three decode steps: every
    row's Δ at every step equals the fp64 HF central difference along that mode's g."""
    cfg = load_config(proxy)
    grad = load_gradient(grads[mode], cfg)
    engine = engine_for(proxy, grads[mode])
    outputs = {i: [] for i in ROWS}
    for i, prompt in ROWS.items():
        engine.add(i, prompt, outputs[i])
    for step in range(4):
        order = [2, 0, 1] if step % 2 else [0, 1, 2]
        result = engine.step(order)
        assert not result.failed
        for pos, i in enumerate(order):
            history = ROWS[i] + outputs[i]
            ref = hf_delta(proxy, grad, history)[-1]
            torch.testing.assert_close(result.delta[pos].double(), ref, rtol=0, atol=5e-6 * float(ref.abs().max()))
            outputs[i].append(int(torch.argmax(ref)) % 300 + 3)


def test_head_mode_is_the_closed_form_of_the_head_gradient(proxy, grads):
    """Δ_head(v) = (G h)_v − Σ_u p_u (G h)_u exactly (h: the final normed hidden state, p: the proxy's
    distribution): one trunk pass carries all the information."""
    cfg = load_config(proxy)
    g_head = load_gradient(grads["head"], cfg)["lm_head.weight"].double()
    tokens = ROWS[0]
    with torch.no_grad():
        out = untied_hf(proxy)(torch.tensor([tokens]), output_hidden_states=True)
    h, p = out.hidden_states[-1][0], torch.softmax(out.logits[0], dim=-1)
    gh = h @ g_head.T
    closed = gh - (p * gh).sum(-1, keepdim=True)
    engine = engine_for(proxy, grads["head"])
    engine.add(0, tokens)
    got = engine.step([0]).delta[0].double()
    torch.testing.assert_close(got, closed[-1], rtol=0, atol=5e-6 * float(closed[-1].abs().max()))


def test_restricted_modes_hold_the_shared_trunk_once(proxy, grads):
    """Weights and KV: a layer g leaves alone is held once, so head holds half the full mode's KV and
    last:1 holds (L + 1) / 2L of it; the parameters shrink likewise."""
    engines = {mode: engine_for(proxy, grads[mode], dtype=torch.float32) for mode in MODES}
    kv = {mode: e.kv.nbytes for mode, e in engines.items()}
    assert kv["head"] * 2 == kv["full"]
    assert kv["last:1"] * 2 * LAYERS == kv["full"] * (LAYERS + 1)
    assert engines["head"].model.layer_copies == [1] * LAYERS
    assert engines["last:2"].model.layer_copies == [1, 2, 2]
    weights = {mode: e.model.parameter_bytes for mode, e in engines.items()}
    assert weights["head"] < weights["last:1"] < weights["last:2"] < weights["full"]


def test_a_gradient_file_must_fit_its_profiles_mode(proxy, grads, tmp_path):
    """A profile naming a mode its file was not written for, or a file whose tensors are another
    mode's, stops start-up with a message naming both."""
    cfg = load_config(proxy)
    with pytest.raises(WeightsError, match="written for Δ mode head, but its profile names last:1"):
        load_gradient(grads["head"], cfg, DeltaMode.parse("last:1"))
    grad = load_gradient(grads["last:1"], cfg)
    meta = {**read_metadata(grads["last:1"]), DELTA_MODE_KEY: "head"}
    gradient.save_gradient(tmp_path / "lying.safetensors", grad, meta)
    with pytest.raises(WeightsError, match="unexpected tensor"):
        load_gradient(tmp_path / "lying.safetensors", cfg)
    meta[DELTA_MODE_KEY] = "last:9"
    gradient.save_gradient(tmp_path / "deep.safetensors", grad, meta)
    with pytest.raises(WeightsError, match="needs 9 blocks"):
        load_gradient(tmp_path / "deep.safetensors", cfg)
    with pytest.raises(SettingsError, match="unknown Δ mode"):
        parse_settings({"proxy": str(proxy), "profiles": {"p": {"gradient": "g", "delta_mode": "tail"}}}, "test")


def test_profiles_of_different_modes_share_one_batch(proxy, grads):
    """Protection with a full, a head and a last:1 profile: each protected row gets λ·Δ of its own
    profile's mode (against the HF reference), the unprotected row nothing, in one apply()."""
    cfg = load_config(proxy)
    profiles = {m.replace(":", ""): {"gradient": str(grads[m]), "delta_mode": m, "epsilon": 1e-3} for m in MODES[:3]}
    settings = parse_settings({"proxy": str(proxy), "profiles": profiles, "check_tokenizer": False}, "test")
    protection = Protection.from_settings(settings)
    rows = {0: ("full", ROWS[0]), 1: ("head", ROWS[1]), 2: ("last1", ROWS[2]), 3: (None, ROWS[0])}
    for i, (profile, prompt) in rows.items():
        args = RequestArgs(2.0, profile) if profile else RequestArgs(0.0)
        protection.add(i, args, prompt, [])
    logits = torch.zeros(len(rows), cfg.vocab_size)
    protection.apply(logits)
    assert torch.count_nonzero(logits[3]) == 0
    for i, (profile, prompt) in rows.items():
        if profile is None:
            continue
        ref = 2.0 * hf_delta(proxy, load_gradient(profiles[profile]["gradient"], cfg), prompt)[-1]
        torch.testing.assert_close(logits[i].double(), ref, rtol=0, atol=2e-3 * float(ref.abs().max()))
