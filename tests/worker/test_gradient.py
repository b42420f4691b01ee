"""The gradient tool against a direct autograd computation through the HF model."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from antidistill.benchmarks.tiny.models import load_hf
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.gradient_file import (
    CONFIG_HASH_KEY,
    DELTA_SCALE_KEY,
    load_gradient,
    read_delta_scale,
    read_metadata,
    save_gradient,
)
from antidistill.proxy_worker.core.rope import RotaryTable
from antidistill.proxy_worker.core.weights import WeightsError, expected_shapes, load_proxy_state, stack_copies
from antidistill.proxy_worker.tools import gradient
from antidistill.proxy_worker.tools.traces import TraceError, read_traces, tokenize_trace

TRACES = [
    {"prompt": "What is 12 plus 30?", "completion": "12 + 30 = 42. #### 42"},
    {"prompt": "Alice has 3 apples and buys 5.", "completion": "3 + 5 = 8 apples. #### 8"},
    {"messages": [{"role": "user", "content": "Solve x + 4 = 10"}, {"role": "assistant", "content": "x = 6 #### 6"}]},
    {"prompt": "Four boxes of 6 eggs?", "completion": "Each box holds 6 eggs, 4 boxes hold 24 eggs. #### 24"},
]


def reference_gradient(path, tokenizer, records):
    """mean_i(mean NLL of trace i's completion tokens), differentiated by plain autograd on HF."""
    model = load_hf(path)
    losses = []
    for rec in records:
        t = tokenize_trace(tokenizer, rec)
        ids = torch.tensor([t.ids])
        logits = model(ids).logits[0]
        losses.append(F.cross_entropy(logits[t.prompt_len - 1 : -1], ids[0, t.prompt_len :]))
    loss = torch.stack(losses).mean()
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}, loss.item()


def relative_error(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in b)
    den = sum(float((b[k].double() ** 2).sum()) for k in b)
    return (num / den) ** 0.5


@pytest.mark.parametrize("family,kw", [("llama", {"tie": True}), ("qwen2", {})], ids=["llama-tied", "qwen2"])
def test_gradient_matches_direct_autograd(model_dir, tokenizer, family, kw):
    path = model_dir(family, **kw)
    cfg = load_config(path)
    traces = [tokenize_trace(tokenizer, r) for r in TRACES]
    # a small pass budget forces several passes, checking the accumulation across them
    grad, loss = gradient.compute_gradient(cfg, load_proxy_state(path, cfg), traces, batch_tokens=40)
    ref, ref_loss = reference_gradient(path, tokenizer, TRACES)
    assert set(grad) == set(ref) == set(expected_shapes(cfg))
    assert relative_error(grad, ref) <= 1e-5
    assert loss == pytest.approx(ref_loss, rel=1e-5)


def test_traces_are_weighted_equally_not_by_length(model_dir):
    """ℓ is the mean of per-trace means: a 1-token and a 27-token completion count the same."""
    path = model_dir("llama")
    cfg = load_config(path)
    theta = load_proxy_state(path, cfg)
    short, long = gradient.TokenizedTrace([1, 2, 3], 2), gradient.TokenizedTrace(list(range(1, 30)), 2)
    per_trace = gradient.trace_losses(stack_copies([theta], cfg, torch.float32), cfg, RotaryTable(cfg), [short, long])
    _, loss = gradient.compute_gradient(cfg, theta, [short, long])
    token_weighted = float(per_trace[0] * 1 + per_trace[1] * 27) / 28
    assert loss == pytest.approx(float(per_trace.mean()), rel=1e-6)
    assert abs(loss - token_weighted) > 1e-3


def test_cli_writes_named_tensors_and_metadata(model_dir, tmp_path):
    path = model_dir("qwen3")
    traces = tmp_path / "holdout.jsonl"
    traces.write_text("\n".join(json.dumps(r) for r in TRACES) + "\n")
    out = tmp_path / "g" / "grad.safetensors"
    assert gradient.main(["--proxy", str(path), "--traces", str(traces), "--out", str(out)]) == 0
    cfg = load_config(path)
    grad = load_gradient(out, cfg)
    assert set(grad) == set(expected_shapes(cfg))
    assert any(float(g.abs().max()) > 0 for g in grad.values())
    meta = read_metadata(out)
    assert meta[CONFIG_HASH_KEY] == cfg.digest
    assert int(meta["num_traces"]) == len(TRACES)
    assert int(meta["num_tokens"]) > 0 and float(meta["mean_loss"]) > 0
    assert meta["dtype"] == "float32" and "mean over traces" in meta["weighting"]


def test_built_file_from_records_is_the_computed_gradient(model_dir, tokenizer, tmp_path):
    """``build_gradient_file`` on in-memory records: exactly compute_gradient's tensors, stamped
    with the proxy's config hash."""
    path = model_dir("llama", tie=True)
    cfg = load_config(path)
    built = gradient.build_gradient_file(path, TRACES, tmp_path / "g.safetensors", tokenizer=tokenizer)
    direct, loss = gradient.compute_gradient(
        cfg, load_proxy_state(path, cfg), [tokenize_trace(tokenizer, r) for r in TRACES]
    )
    stored = load_gradient(built.path, cfg)
    assert set(stored) == set(direct) and all(torch.equal(stored[k], direct[k]) for k in direct)
    assert built.mean_loss == loss and len(built.traces) == len(TRACES)
    meta = read_metadata(built.path)
    assert meta[CONFIG_HASH_KEY] == cfg.digest and int(meta["num_traces"]) == len(TRACES)
    assert "traces" not in meta, "records have no file name to record"


@pytest.mark.parametrize(
    "line,needle",
    [
        ("{not json", ":1: invalid JSON"),
        ('{"prompt": "x"}', ":1: expected"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "must end with an assistant"),
    ],
)
def test_bad_trace_lines_name_the_line(tmp_path, line, needle):
    f = tmp_path / "t.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(TraceError, match=needle):
        read_traces(f)


def hf_delta_scale(path, grad, tokenizer, records, positions_per_trace):
    """The Δ scale recomputed through the HF model: central differences of log-softmax in fp64 along
    g, std over the vocabulary at each trace's completion positions, averaged."""
    model = load_hf(path, torch.float64)
    params = dict(model.named_parameters())
    stds = []
    for rec in records:
        t = tokenize_trace(tokenizer, rec)
        where = positions_per_trace(t)
        logp = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for name, p in params.items():
                    p.add_(sign * 1e-6 * grad[name].double())
                logp.append(torch.log_softmax(model(torch.tensor([t.ids])).logits[0, where], dim=-1))
                for name, p in params.items():
                    p.sub_(sign * 1e-6 * grad[name].double())
        stds.append(((logp[0] - logp[1]) / 2e-6).std(dim=-1))
    return float(torch.cat(stds).mean())


def test_gradient_file_stores_the_delta_scale(model_dir, tokenizer, tmp_path):
    """The stored s is Δ's per-position std over the vocabulary at completion positions, as an
    independent fp64 finite difference through HF computes it (what strength = λ·s is measured in)."""
    path = model_dir("llama", tie=True)
    cfg = load_config(path)
    built = gradient.build_gradient_file(path, TRACES, tmp_path / "g.safetensors", tokenizer=tokenizer)
    stored = read_delta_scale(built.path)
    positions = partial(gradient.completion_positions, count=gradient.SCALE_POSITIONS)
    reference = hf_delta_scale(path, load_gradient(built.path, cfg), tokenizer, TRACES, positions)
    # HF computes its rotary angles in fp32 even in an fp64 model (autocast off, .float()), so the
    # independent reference carries fp32 rounding that depends on the CPU's kernels: measured 1.2e-4
    # relative on an AMD EPYC (avx512_bf16), below 1e-4 elsewhere. Hence 5e-4 here, and the tight
    # check below, against the same exact Δ computed in fp64, for the precision of the fp32 path.
    assert stored == pytest.approx(reference, rel=5e-4)
    in_fp64 = gradient.measure_delta_scale(cfg, built.theta, built.grad, built.traces, dtype=torch.float64)
    assert stored == pytest.approx(in_fp64, rel=1e-5)
    assert stored > 0


def test_completion_positions_predict_completion_tokens_only():
    t = gradient.TokenizedTrace(list(range(1, 21)), 5)  # tokens 5..19 are the completion
    assert gradient.completion_positions(t, 100) == list(range(4, 19))
    spaced = gradient.completion_positions(t, 4)
    assert spaced[0] == 4 and spaced[-1] == 18 and len(spaced) == 4


def test_add_scale_stores_it_in_an_older_gradient_and_keeps_g(model_dir, tokenizer, tmp_path):
    """A gradient written before scales were stored gets one from ``--add-scale``: the same s a
    fresh build stores, with g and the other metadata unchanged."""
    path = model_dir("qwen3")
    cfg = load_config(path)
    traces = tmp_path / "holdout.jsonl"
    traces.write_text("\n".join(json.dumps(r) for r in TRACES) + "\n")
    fresh = gradient.build_gradient_file(path, traces, tmp_path / "fresh.safetensors", tokenizer=tokenizer)
    old = tmp_path / "old.safetensors"
    legacy = {k: v for k, v in fresh.metadata.items() if k != DELTA_SCALE_KEY}
    save_gradient(old, fresh.grad, legacy)
    assert read_delta_scale(old) is None
    assert gradient.main(["--add-scale", "--proxy", str(path), "--traces", str(traces), "--out", str(old)]) == 0
    assert read_delta_scale(old) == read_delta_scale(fresh.path)
    kept = load_gradient(old, cfg)
    assert all(torch.equal(kept[k], fresh.grad[k]) for k in fresh.grad)
    assert {k: v for k, v in read_metadata(old).items() if k != DELTA_SCALE_KEY} == {
        k: str(v) for k, v in legacy.items()
    }


@pytest.mark.parametrize("value", ["nan", "-1", "0", "abc"])
def test_a_bad_stored_scale_is_named(model_dir, tmp_path, value):
    cfg = load_config(model_dir("llama"))
    g = {k: torch.zeros(s) for k, s in expected_shapes(cfg).items()}
    save_gradient(tmp_path / "g.safetensors", g, {DELTA_SCALE_KEY: value})
    with pytest.raises(WeightsError, match=f"metadata {DELTA_SCALE_KEY} must be a finite number > 0"):
        read_delta_scale(tmp_path / "g.safetensors")
