"""The paged FlexAttention path (``attention="flex"``) against the reference gather path: the same
attention output and the same Δ (fp32, max abs error ≤ 1e-5) for mixed prefill/decode batches,
rows sharing prefix blocks, sliding windows, positions on block boundaries and grouped-query
attention; and its block lists against the dense mask they stand for.

Compiling is the slow part, so the shapes stay tiny and few: every case pads to the same few
buckets (one query per row, or ≤ 16) of one store, and the compiled kernels are shared by the
whole module (``compiled_flex_attention`` is per process).
"""

from __future__ import annotations

import random

import pytest
import torch
from antidistill.proxy_worker.core.config import ProxyConfig, parse_config
from antidistill.proxy_worker.core.delta import finite_difference
from antidistill.proxy_worker.core.model import StackedProxy, attention
from antidistill.proxy_worker.core.paged_blocks import PagedBlocks
from antidistill.proxy_worker.core.plan import FLEX_MIN_KEYS, PagedSlots, build_plan
from antidistill.proxy_worker.core.weights import expected_shapes, stack_copies
from antidistill.proxy_worker.runtime.engine import ProxyEngine
from torch._dynamo.utils import counters

BS = 4
STORE_BLOCKS = 48
TOL = 1e-5
VOCAB = 97
WINDOW = 5  # under two blocks: the window's far edge falls inside a block, and moves across them

_rng = random.Random(7)
_PHYSICAL = _rng.sample(range(STORE_BLOCKS), STORE_BLOCKS)  # scattered ids: no accidental contiguity
SHARED = _PHYSICAL[:3]  # three full blocks two rows hold (a shared 12-token prefix)

# (block table, start, new tokens): decode rows on and off block boundaries, prefill chunks that
# start at 0, mid-block and on a boundary and cross several blocks, rows reading shared blocks
CASES = {
    "decode": [
        (_PHYSICAL[3:6], 8, 1),  # position 8 opens a new block
        (_PHYSICAL[6:8], 7, 1),  # position 7 is the last slot of block 1
        (_PHYSICAL[8:9], 0, 1),  # the first token of a row
        (_PHYSICAL[9:14], 17, 1),
    ],
    "mixed": [
        (_PHYSICAL[14:18], 5, 11),  # a chunk from mid-block 1 to the end of block 3
        (_PHYSICAL[18:21], 10, 1),
        (_PHYSICAL[21:23], 0, 6),  # a prompt's first chunk
        (_PHYSICAL[23:26], 8, 4),  # a chunk that fills exactly one block
        (_PHYSICAL[26:29], 11, 1),
    ],
    "shared": [
        ([*SHARED, _PHYSICAL[29]], 12, 3),  # both rows read the same three physical blocks
        ([*SHARED, _PHYSICAL[30], _PHYSICAL[31]], 13, 1),
        ([*SHARED[:2], _PHYSICAL[32]], 9, 1),  # a third row sharing only two of them
    ],
}


def config(heads: int, kv_heads: int, window: int | None = None) -> ProxyConfig:
    raw = dict(
        model_type="mistral" if window else "llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=8,
        max_position_embeddings=256,
        sliding_window=window,
    )
    return parse_config(raw, "test")


def case_rows(case: str) -> tuple[list[list[int]], list[int], PagedSlots]:
    """The case's new tokens, start positions and block tables."""
    rows = CASES[case]
    new = [[(7 * i + j) % VOCAB for j in range(n)] for i, (_, _, n) in enumerate(rows)]
    return new, [s for _, s, _ in rows], PagedSlots([t for t, _, _ in rows], BS, STORE_BLOCKS)


def plans(case: str, window: int | None) -> tuple:
    new, starts, paged = case_rows(case)
    return tuple(build_plan(new, starts, paged, window, attention=path) for path in ("reference", "flex"))


def attend(plans: tuple, heads: int, kv_heads: int, seed: object) -> list[torch.Tensor]:
    """Every plan's attention output on one random store and one set of queries."""
    gen = torch.Generator().manual_seed(hash(seed) % 2**31)
    d, n = 8, plans[0].tokens.numel()
    k, v = (torch.randn(2, kv_heads, STORE_BLOCKS * BS, d, generator=gen) for _ in range(2))
    q = torch.randn(2, n, heads, d, generator=gen)
    return [attention(q, k, v, plan, d**-0.5) for plan in plans]


def attention_pair(heads: int, kv_heads: int, case: str, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    reference, flex = attend(plans(case, window), heads, kv_heads, (heads, kv_heads, case))
    return reference, flex


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("window", [None, WINDOW], ids=["causal", "window"])
def test_reference_path_gathers_whole_blocks_as_slots_would(case: str, window: int | None) -> None:
    """With block tables the reference path copies whole blocks (one index per BS keys, the grid
    rounded up to whole blocks); the same rows given slot by slot attend the same."""
    new, starts, paged = case_rows(case)
    longest = max(s + len(t) for s, t in zip(starts, new, strict=True))
    by_block = build_plan(new, starts, paged, window)
    by_slot = build_plan(new, starts, paged.slots(range(len(new)), longest), window)
    assert all(g.kv_blocks is not None and g.kv_index.shape[1] % BS == 0 for g in by_block.groups)
    assert all(g.kv_blocks is None for g in by_slot.groups)
    block_out, slot_out = attend((by_block, by_slot), 4, 2, (case, window))
    assert (block_out - slot_out).abs().max().item() <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("window", [None, WINDOW], ids=["causal", "window"])
def test_gqa_attention_output_matches_reference(case: str, window: int | None) -> None:
    ref, got = attention_pair(4, 2, case, window)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("case", ["mixed", "shared"])
def test_multi_head_attention_output_matches_reference(case: str) -> None:
    ref, got = attention_pair(2, 2, case, None)
    assert (got - ref).abs().max().item() <= TOL


def test_flex_plans_read_the_store_through_block_lists_only() -> None:
    reference, flex = plans("mixed", None)
    assert all(g.paged is None for g in reference.groups)
    assert all(isinstance(g.paged, PagedBlocks) for g in flex.groups)
    assert {g.paged.width for g in flex.groups} == {STORE_BLOCKS}
    # a plan without a cache has nothing paged to read: it stays on the reference path
    full = build_plan([[1, 2, 3]], [0], attention="flex")
    assert all(g.paged is None for g in full.groups)


def test_auto_reads_in_place_only_decode_groups_big_enough_to_gain() -> None:
    """``attention="auto"``: a decode group of FLEX_MIN_KEYS key cells gets block lists; one row fewer,
    or a prefill chunk's group in the same pass, gathers (the reference path)."""
    context, rows = 1024, FLEX_MIN_KEYS // 1024
    per_row = context // BS
    paged = PagedSlots([list(range(r * per_row, (r + 1) * per_row)) for r in range(rows + 1)], BS)
    big = build_plan([[1]] * rows, [context - 1] * rows, paged, attention="auto")
    assert [g.paged is not None for g in big.groups] == [True]
    small = build_plan([[1]] * (rows - 1), [context - 1] * (rows - 1), paged, attention="auto")
    assert [g.paged is not None for g in small.groups] == [False]
    mixed = build_plan([[1] * 64] + [[1]] * rows, [context - 64] + [context - 1] * rows, paged, attention="auto")
    assert sorted((g.query_index.shape[1], g.paged is not None) for g in mixed.groups) == [(1, True), (64, False)]


def test_another_batch_of_the_same_bucket_does_not_compile_again() -> None:
    attention_pair(4, 2, "decode", None)
    before = counters["stats"]["unique_graphs"]
    rows = [(t, s + 1, 1) for t, s, _ in CASES["decode"][:3] if len(t) * BS > s + 1]
    CASES["three"] = rows
    try:
        ref, got = attention_pair(4, 2, "three", None)
    finally:
        del CASES["three"]
    assert (got - ref).abs().max().item() <= TOL
    assert counters["stats"]["unique_graphs"] == before


def dense_mask(paged: PagedBlocks, tables: list[list[int]], b: int, s: int, t: int) -> torch.Tensor:
    """What the block lists let each real grid query see: keys of its full blocks, and of its
    partial blocks where the per-key rule (position ≤ the query's, within the window) holds."""
    bs, window = paged.block_size, paged.sliding_window
    out = torch.zeros(b, s, t, dtype=torch.bool)
    for r in range(b):
        logical = {blk: j for j, blk in enumerate(tables[r])}
        for q in range(s):
            qb, p = q // paged.q_block, int(paged.positions[r, q])
            full = paged.full_kv_indices[r, 0, qb, : paged.full_kv_num_blocks[r, 0, qb]].tolist()
            partial = paged.kv_indices[r, 0, qb, : paged.kv_num_blocks[r, 0, qb]].tolist()
            assert not set(full) & set(partial)
            for blk in full + partial:
                for o in range(bs):
                    pos = logical[blk] * bs + o
                    seen = blk in full or (pos <= p and (window is None or p - pos < window))
                    if pos < t:
                        out[r, q, pos] = seen
                    else:
                        assert not seen, "a full block reaches past the row's keys"
    return out


@pytest.mark.parametrize("window", [None, 1, 3, WINDOW, 9])
def test_block_lists_equal_the_dense_mask(window: int | None) -> None:
    rng = random.Random(window or 0)
    for _ in range(30):
        nrows = rng.randint(1, 5)
        counts = [rng.choice([1, 1, rng.randint(1, 40)]) for _ in range(nrows)]
        starts = [rng.randint(0, 30) for _ in range(nrows)]
        ids = rng.sample(range(STORE_BLOCKS * 4), STORE_BLOCKS * 4)
        tables = [ids[i * 20 : i * 20 + -(-(s + c) // BS)] for i, (s, c) in enumerate(zip(starts, counts, strict=True))]
        plan = build_plan([[0] * c for c in counts], starts, PagedSlots(tables, BS), window, attention="flex")
        for group in plan.groups:
            paged = group.paged
            b, s, t = group.mask.shape
            rows = [tables[r] for r in _rows_of(group, starts, counts)]
            seen = dense_mask(paged, rows, b, s, t)
            valid = group.query_valid
            assert torch.equal(seen[valid], group.mask[valid])
            assert not paged.query_valid[b:].any() and paged.kv_num_blocks[b:].eq(0).all()


def _rows_of(group: object, starts: list[int], counts: list[int]) -> list[int]:
    """The plan's row of each group row (groups list rows by their packed offset)."""
    offsets = [sum(counts[:r]) for r in range(len(counts))]
    return [offsets.index(int(i)) for i in group.query_index[:, 0]]


def two_copy(cfg: ProxyConfig) -> StackedProxy:
    gen = torch.Generator().manual_seed(3)
    theta = {k: torch.randn(s, generator=gen) * 0.3 for k, s in expected_shapes(cfg).items()}
    grad = {k: torch.randn(v.shape, generator=gen) for k, v in theta.items()}
    copies = [{k: theta[k] + sign * 0.1 * grad[k] for k in theta} for sign in (1, -1)]
    return StackedProxy(cfg, stack_copies(copies, cfg, torch.float32))


@pytest.fixture(scope="module", params=[None, WINDOW], ids=["causal", "window"])
def model(request: pytest.FixtureRequest) -> StackedProxy:
    return two_copy(config(4, 2, request.param))


def test_engine_delta_matches_reference_through_prefill_decode_and_sharing(model: StackedProxy) -> None:
    """Two engines, one per path, through the same steps: chunked prefills beside decode rows,
    prompts sharing full blocks (the cache hands the later rows the earlier rows' blocks), and
    decode steps whose positions cross block boundaries."""
    engines = {
        path: ProxyEngine(model, 0.1, STORE_BLOCKS * BS, block_size=BS, max_pass_tokens=16, attention=path)
        for path in ("reference", "flex")
    }
    rng = random.Random(2)
    prefix = [rng.randrange(VOCAB) for _ in range(13)]
    prompts = [prefix + [rng.randrange(VOCAB) for _ in range(n)] for n in (2, 5)]
    prompts += [[rng.randrange(VOCAB) for _ in range(n)] for n in (3, 20)]
    outputs: list[list[int]] = [[] for _ in prompts]
    for engine in engines.values():
        engine.add(0, prompts[0], outputs[0])
    for step in range(9):
        if step == 1:  # rows 1-3 join while row 0 decodes: one of them reuses row 0's full blocks
            for engine in engines.values():
                for r in (1, 2, 3):
                    engine.add(r, prompts[r], outputs[r])
        live = [0] if step == 0 else [0, 1, 2, 3]
        results = {path: engine.step(live) for path, engine in engines.items()}
        assert not results["reference"].failed and not results["flex"].failed
        err = (results["flex"].delta - results["reference"].delta).abs().max().item()
        assert err <= TOL, f"step {step}: |Δ_flex − Δ_reference| = {err:.2e}"
        for r in live:
            outputs[r].append(rng.randrange(VOCAB))
    assert engines["flex"].cache.rows[1].shared == 3  # the prefix sharing really happened


def test_delta_of_one_pass_matches_reference(model: StackedProxy) -> None:
    """Δ straight from one two-copy pass over the mixed batch (no engine bookkeeping)."""
    reference, flex = plans("mixed", model.cfg.sliding_window)
    kv = ProxyEngine(model, 0.1, STORE_BLOCKS * BS, block_size=BS).cache.store
    gen = torch.Generator().manual_seed(4)
    for t in (*kv.k, *kv.v):
        t.copy_(torch.randn(t.shape, generator=gen))
    ref = finite_difference(model.logits(reference, kv), 0.1)
    got = finite_difference(model.logits(flex, kv), 0.1)
    assert (got - ref).abs().max().item() <= TOL
