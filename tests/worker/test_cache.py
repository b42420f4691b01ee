"""The proxy KV cache's prefix sharing on its own: which blocks a row takes, what it registers,
when blocks are freed, that a failed reservation changes nothing, and that sharing stays within a
tenant (a salt)."""

from __future__ import annotations

import pytest
import torch
from antidistill.proxy_worker.core.config import parse_config
from antidistill.proxy_worker.runtime.cache import ROOT, ProxyBudgetExceeded, ProxyKVCache, block_digest, chain_root

CFG = parse_config(
    dict(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
)


def pool(blocks: int = 8) -> ProxyKVCache:
    return ProxyKVCache(CFG, 2, torch.float32, token_budget=4 * blocks, block_size=4)


def test_digest_chains_the_prefix():
    first = block_digest(ROOT, [1, 2, 3, 4])
    assert block_digest(ROOT, [1, 2, 3, 4]) == first != block_digest(ROOT, [1, 2, 3, 5])
    assert block_digest(first, [5, 6, 7, 8]) != block_digest(block_digest(ROOT, [9, 9, 9, 9]), [5, 6, 7, 8])
    assert len(first) == 32


def test_an_identical_prompt_takes_all_but_the_block_holding_its_last_token():
    cache = pool()
    tokens = list(range(1, 9))
    cache.add(0, tokens)
    cache.add(1, list(tokens))
    a, b = cache.rows[0], cache.rows[1]
    cache.reserve(a, 8)
    assert a.shared == 0 and cache.registered_blocks == 2
    cache.reserve(b, 8)
    assert b.shared == 1 and b.blocks[0] == a.blocks[0] and b.blocks[1] != a.blocks[1]
    assert b.computed == 4 and not cache.ready(b)
    cache.mark_written(a, 0, 8)
    assert cache.ready(b) and cache.refs[a.blocks[0]] == 2
    assert cache.used_tokens == 3 * 4


def test_output_blocks_are_registered_for_later_rows():
    cache = pool()
    output = [5, 6]
    cache.add(0, [1, 2], output)
    cache.reserve(cache.rows[0], 4)
    cache.mark_written(cache.rows[0], 0, 4)
    output.extend([7, 8, 9, 10])
    cache.reserve(cache.rows[0], 8)
    cache.add(1, [1, 2, 5, 6, 7, 8, 9, 10, 11])
    cache.reserve(cache.rows[1], 9)
    assert cache.rows[1].shared == 2 and cache.rows[1].blocks[:2] == cache.rows[0].blocks


def test_failed_reservation_changes_nothing_and_last_reference_frees():
    cache = pool(blocks=3)
    cache.add(0, list(range(1, 9)))
    cache.reserve(cache.rows[0], 8)
    cache.mark_written(cache.rows[0], 0, 8)
    cache.add(1, [*range(1, 9), 20, 21, 22, 23, 24])
    refs = list(cache.refs)
    with pytest.raises(ProxyBudgetExceeded):
        cache.reserve(cache.rows[1], 13)
    assert cache.refs == refs and cache.rows[1].blocks == [] and cache.free_blocks == 1
    cache.add(2, [*range(1, 9), 30])
    cache.reserve(cache.rows[2], 9)
    cache.remove(0)
    assert cache.used_tokens == 3 * 4 and cache.registered_blocks == 2
    cache.remove(2)
    assert cache.used_tokens == 0 and cache.registered_blocks == 0 and cache.free_blocks == 3


def reserved(cache: ProxyKVCache, index: int, tokens: list[int], salt: str | None) -> list[int]:
    """Add a row, reserve its whole history and mark it written (as a finished pass would)."""
    cache.add(index, tokens, salt=salt)
    row = cache.rows[index]
    cache.reserve(row, len(tokens))
    cache.mark_written(row, 0, len(tokens))
    return row.blocks


def test_rows_of_different_tenants_never_share_a_block():
    """A harvester replaying another tenant's prompt must not land on its proxy KV (a faster first
    token would tell it the prompt was seen): the same tokens under another salt take nothing."""
    cache = pool(blocks=12)
    tokens = list(range(1, 10))
    first = reserved(cache, 0, tokens, "tenant-a")
    other = reserved(cache, 1, list(tokens), "tenant-b")
    unsalted = reserved(cache, 2, list(tokens), None)
    assert cache.rows[1].shared == 0 and not set(first) & set(other)
    assert cache.rows[2].shared == 0 and not set(unsalted) & (set(first) | set(other))
    assert cache.registered_blocks == 3 * 2, "each tenant's chain is registered apart"


def test_rows_of_the_same_tenant_still_share():
    cache = pool(blocks=12)
    tokens = list(range(1, 10))
    first = reserved(cache, 0, tokens, "tenant-a")
    again = reserved(cache, 1, list(tokens), "tenant-a")
    assert cache.rows[1].shared == 2 and again[:2] == first[:2]
    plain = reserved(cache, 2, list(tokens), None)
    plain_again = reserved(cache, 3, list(tokens), None)
    assert cache.rows[3].shared == 2 and plain_again[:2] == plain[:2], "unsalted rows share as before"


def test_the_salted_root_is_its_own_domain():
    assert chain_root(None) == ROOT
    roots = {chain_root(s) for s in ("a", "b", "tenant-a")}
    assert len(roots) == 3 and ROOT not in roots and chain_root("a") == chain_root("a")
    assert chain_root("a") != block_digest(ROOT, []), "a salt's root is no block's digest"
    cache = pool()
    cache.add(0, [1, 2, 3, 4, 5], salt="a")
    cache.reserve(cache.rows[0], 5)
    assert cache.rows[0].digests[0] == block_digest(chain_root("a"), [1, 2, 3, 4])
    cache.rebuild(0)
    assert cache.rows[0].root == chain_root("a"), "a rebuilt row stays in its tenant's chain"
