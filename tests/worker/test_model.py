"""The proxy transformer against Hugging Face transformers, and its cache/batching invariants."""

from __future__ import annotations

import random

import pytest
import torch
from antidistill.benchmarks.tiny.models import load_hf
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.model import StackedProxy
from antidistill.proxy_worker.core.plan import PAD_SLACK, build_plan, group_rows
from antidistill.proxy_worker.core.weights import load_proxy_state, perturbed_copies, stack_copies, stack_perturbed
from antidistill.proxy_worker.runtime.cache import ProxyKVCache
from hypothesis import given
from hypothesis import strategies as st

SEQS = [[5, 9, 33, 2, 7, 100, 3, 4, 55, 66, 77, 88, 301, 17], [3, 4, 5], list(range(40, 90))]


def one_copy(path):
    cfg = load_config(path)
    theta = load_proxy_state(path, cfg)
    return cfg, theta, StackedProxy(cfg, stack_copies([theta], cfg, torch.float32))


def hf_logits(model, seqs):
    with torch.no_grad():
        return torch.cat([model(torch.tensor([s])).logits[0] for s in seqs])


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", {}),
        ("qwen2", {}),
        ("qwen3", {}),
        ("mistral", {"sliding_window": 9}),
        ("llama", {"tie": True}),
        ("qwen2", {"shard": True}),
    ],
    ids=["llama", "qwen2-bias", "qwen3-qknorm", "mistral-window", "llama-tied", "qwen2-sharded"],
)
def test_logits_match_transformers(model_dir, family, kw):
    path = model_dir(family, **kw)
    _, _, proxy = one_copy(path)
    plan = build_plan(SEQS, [0] * len(SEQS), sliding_window=proxy.cfg.sliding_window)
    ours = proxy.logits(plan, output="all")[0]
    ref = hf_logits(load_hf(path), SEQS)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_sharded_checkpoint_really_is_sharded(model_dir):
    path = model_dir("qwen2", shard=True)
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_fp32(model_dir, dtype):
    path = model_dir("llama")
    cfg, theta, full = one_copy(path)
    half = StackedProxy(cfg, stack_copies([theta], cfg, dtype))
    plan = build_plan(SEQS, [0] * len(SEQS))
    a, b = full.logits(plan, output="all")[0], half.logits(plan, output="all")[0].float()
    assert half.dtype == dtype
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_incremental_chunks_equal_full_forward(model_dir):
    path = model_dir("qwen3")
    cfg, _, proxy = one_copy(path)
    seq = SEQS[2]
    full = proxy.logits(build_plan([seq], [0]), output="all")[0]
    cache = ProxyKVCache(cfg, 1, torch.float32, token_budget=256, block_size=4)
    cache.add(0, seq)
    row = cache.rows[0]
    rng = random.Random(1)
    while row.computed < len(seq):
        end = min(len(seq), row.computed + rng.randint(1, 9))
        cache.reserve(row, end)
        plan = build_plan([seq[row.computed : end]], [row.computed], cache.slot_table([row], end))
        got = proxy.logits(plan, cache.store)[0, 0]
        assert (got - full[end - 1]).abs().max().item() <= 1e-4
        row.computed = end


def test_rows_of_different_lengths_batched_equal_each_alone(model_dir):
    path = model_dir("llama")
    cfg, _, proxy = one_copy(path)
    # two rows with cached prefixes of different lengths, extended by different chunk sizes
    cache = ProxyKVCache(cfg, 1, torch.float32, token_budget=512, block_size=8)
    prefixes, news = [SEQS[2][:30], SEQS[0][:5], [7]], [SEQS[2][30:31], SEQS[0][5:12], [8, 9, 10]]
    rows = []
    for i, (pre, new) in enumerate(zip(prefixes, news, strict=True)):
        cache.add(i, pre + new)
        row = cache.rows[i]
        cache.reserve(row, len(pre) + len(new))
        proxy.logits(build_plan([pre], [0], cache.slot_table([row], len(pre))), cache.store)
        row.computed = len(pre)
        rows.append(row)
    ends = [len(p) + len(n) for p, n in zip(prefixes, news, strict=True)]
    plan = build_plan(news, [len(p) for p in prefixes], cache.slot_table(rows, max(ends)))
    batched = proxy.logits(plan, cache.store)[0]
    for i, (pre, new) in enumerate(zip(prefixes, news, strict=True)):
        alone = proxy.logits(build_plan([pre + new], [0]))[0, 0]
        assert (batched[i] - alone).abs().max().item() <= 1e-4


def test_two_copy_pass_equals_two_hf_models(model_dir, tmp_path):
    path = model_dir("qwen2")
    cfg = load_config(path)
    theta = load_proxy_state(path, cfg)
    gen = torch.Generator().manual_seed(3)
    grad = {k: torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    eps = 0.05
    plus, minus = perturbed_copies(theta, grad, (eps, -eps))
    stacked = StackedProxy(cfg, stack_copies([plus, minus], cfg, torch.float32))
    assert stacked.copies == 2
    plan = build_plan(SEQS, [0] * len(SEQS))
    ours = stacked.logits(plan, output="all")
    for copy, weights in enumerate((plus, minus)):
        hf = load_hf(path)
        hf.load_state_dict(weights, strict=False)
        ref = hf_logits(hf, SEQS)
        assert (ours[copy] - ref).abs().max().item() <= 1e-4
    assert (ours[0] - ours[1]).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "family,kw", [("llama", {}), ("qwen2", {}), ("llama", {"tie": True})], ids=["llama", "qwen2-bias", "llama-tied"]
)
def test_prepacked_linears_match_the_matmul_layout(model_dir, family, kw):
    """``gemm="packed"`` prepacks every linear for oneDNN (fp32 on CPU): the same logits as the plain
    batched-matmul layout (the default), from a cached decode as from a full forward, and no second
    copy of the linear weights is kept."""
    path = model_dir(family, **kw)
    cfg = load_config(path)
    theta = load_proxy_state(path, cfg)
    gen = torch.Generator().manual_seed(5)
    grad = {k: torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    params = stack_perturbed(theta, grad, (0.05, -0.05), cfg, torch.float32)
    packed, plain = StackedProxy(cfg, params, gemm="packed"), StackedProxy(cfg, params)
    names = {f"layers.{i}.{n}" for i in range(cfg.num_layers) for n in ("qkv", "o", "gate_up", "down")}
    assert set(packed.linears) == names | {"lm_head"} and not plain.linears
    assert not {"lm_head", "layers.0.qkv", "layers.0.qkv_bias"} & set(packed.params)
    assert packed.parameter_bytes == plain.parameter_bytes
    plan = build_plan(SEQS, [0] * len(SEQS))
    full = packed.logits(plan, output="all"), plain.logits(plan, output="all")
    assert (full[0] - full[1]).abs().max().item() <= 1e-4
    decoded = []
    for model in (packed, plain):
        cache = ProxyKVCache(cfg, 2, torch.float32, token_budget=256, block_size=4)
        cache.add(0, SEQS[2])
        row = cache.rows[0]
        cache.reserve(row, len(SEQS[2]))
        model.logits(build_plan([SEQS[2][:-1]], [0], cache.paged([row])), cache.store)
        decoded.append(model.logits(build_plan([SEQS[2][-1:]], [len(SEQS[2]) - 1], cache.paged([row])), cache.store))
    assert (decoded[0] - decoded[1]).abs().max().item() <= 1e-4
    assert (decoded[0][:, 0] - full[1][:, -1]).abs().max().item() <= 1e-4


def test_prepacking_where_it_does_not_apply_is_refused(model_dir):
    cfg, theta, _ = one_copy(model_dir("llama"))
    with pytest.raises(ValueError, match="fp32 weights on a CPU"):
        StackedProxy(cfg, stack_copies([theta], cfg, torch.float64), gemm="packed")
    assert not StackedProxy(cfg, stack_copies([theta], cfg, torch.float32)).linears  # the default: plain


def test_tied_copies_share_one_embedding_tensor(model_dir):
    path = model_dir("llama", tie=True)
    cfg = load_config(path)
    theta = load_proxy_state(path, cfg)
    assert "lm_head.weight" not in theta
    params = stack_copies([theta, theta], cfg, torch.float32)
    assert params["lm_head"] is params["embed"]


def test_stack_perturbed_equals_copies_and_casts_after_forming_in_fp32(model_dir):
    path = model_dir("qwen2")
    cfg = load_config(path)
    theta = load_proxy_state(path, cfg)
    gen = torch.Generator().manual_seed(4)
    grad = {k: torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    streamed = stack_perturbed(theta, grad, (0.01, -0.01), cfg, torch.float32)
    reference = stack_copies(perturbed_copies(theta, grad, (0.01, -0.01)), cfg, torch.float32)
    assert streamed.keys() == reference.keys()
    assert all(torch.equal(streamed[k], reference[k]) for k in reference)
    # θ = 1 + 3·2⁻⁹, g = 1, ε = 2⁻⁹: θ − εg = 1 + 2⁻⁸ rounds to 1.0 in bf16 when formed in fp32 first,
    # but to 1.0078125 if θ were cast to bf16 before the perturbation
    theta1 = {k: torch.full_like(v, 1 + 3 * 2**-9) for k, v in theta.items()}
    ones = {k: torch.ones_like(v) for k, v in theta.items()}
    bf16 = stack_perturbed(theta1, ones, (2**-9, -(2**-9)), cfg, torch.bfloat16)
    cast_first = (torch.tensor(1 + 3 * 2**-9).to(torch.bfloat16) - 2**-9).to(torch.bfloat16)
    assert bf16["norm"][1, 0].item() == 1.0 != cast_first.item()


@given(st.lists(st.tuples(st.integers(1, 600), st.integers(0, 3000)), min_size=1, max_size=40))
def test_row_groups_pad_each_row_to_at_most_slack_times_its_grid(shapes):
    queries = [s for s, _ in shapes]
    keys = [s + start for s, start in shapes]
    groups = group_rows(queries, keys)
    assert sorted(i for g in groups for i in g) == list(range(len(shapes)))
    for g in groups:
        s_max, t_max = max(queries[i] for i in g), max(keys[i] for i in g)
        assert all(s_max * t_max <= PAD_SLACK * queries[i] * keys[i] for i in g)


def test_decode_rows_are_not_padded_to_a_prefill_chunk(model_dir):
    """A mixed pass: 6 decode rows and one 40-token chunk get separate grids, and every row's
    logits equal the row computed alone."""
    path = model_dir("llama")
    cfg, _, proxy = one_copy(path)
    cache = ProxyKVCache(cfg, 1, torch.float32, token_budget=1024, block_size=8)
    rng = random.Random(2)
    seqs = [[rng.randrange(300) for _ in range(30 + 3 * i)] for i in range(6)] + [list(range(1, 61))]
    news = [1] * 6 + [40]
    rows = []
    for i, seq in enumerate(seqs):
        cache.add(i, seq)
        row = cache.rows[i]
        cache.reserve(row, len(seq))
        pre = len(seq) - news[i]
        proxy.logits(build_plan([seq[:pre]], [0], cache.paged([row])), cache.store)
        row.computed = pre
        rows.append(row)
    plan = build_plan([s[-n:] for s, n in zip(seqs, news, strict=True)], [r.computed for r in rows], cache.paged(rows))
    assert sorted(tuple(g.mask.shape) for g in plan.groups) == [(1, 40, 64), (6, 1, 48)]  # whole blocks of 8
    assert sum(g.score_cells for g in plan.groups) < len(seqs) * 40 * 60 / 5
    batched = proxy.logits(plan, cache.store)[0]
    for i, seq in enumerate(seqs):
        alone = proxy.logits(build_plan([seq], [0]))[0, 0]
        assert (batched[i] - alone).abs().max().item() <= 1e-4
