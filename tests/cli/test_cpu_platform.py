"""The CPU settings ``antidistill serve`` adds before vLLM starts: all cores to the model worker on
a small box, an allocator that keeps freed memory; an operator's own choice is never overridden."""

from __future__ import annotations

import os

import pytest
from antidistill.server.startup.cpu_platform import (
    BIND_ENV,
    RESERVED_ENV,
    TUNABLES_ENV,
    CoresError,
    apply_engine_env,
    bind_env,
    engine_env,
    local_workers,
    pipeline_eager_problem,
)


def test_a_two_core_box_reserves_no_core_and_keeps_freed_memory():
    added = engine_env({}, 2)
    assert added[RESERVED_ENV] == "0"
    assert added[TUNABLES_ENV] == "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"


def test_bigger_boxes_keep_vllms_core_reservation():
    assert RESERVED_ENV not in engine_env({}, 3) and TUNABLES_ENV in engine_env({}, 64)


@pytest.mark.parametrize(
    "environ,kept",
    [
        ({RESERVED_ENV: "1"}, RESERVED_ENV),
        ({TUNABLES_ENV: "glibc.malloc.arena_max=2"}, TUNABLES_ENV),
        ({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, TUNABLES_ENV),
    ],
    ids=["reserved-set", "tunables-set", "tcmalloc-preloaded"],
)
def test_an_operators_own_setting_wins(environ, kept):
    assert kept not in engine_env(environ, 2)


def test_applying_exports_for_the_engine_and_says_so(monkeypatch):
    monkeypatch.delenv(RESERVED_ENV, raising=False)
    monkeypatch.delenv(TUNABLES_ENV, raising=False)
    lines = apply_engine_env(engine_env({}, 2))
    assert os.environ[RESERVED_ENV] == "0" and os.environ[TUNABLES_ENV].startswith("glibc.malloc.mmap_max=0")
    assert len(lines) == 2 and RESERVED_ENV in lines[0] and TUNABLES_ENV in lines[1]


def test_more_workers_than_numa_nodes_get_the_cores_split_between_them():
    """vLLM's autobind gives each local worker a NUMA node and stops when there are fewer nodes."""
    assert bind_env({}, [0, 1], nodes=1, workers=2) == {BIND_ENV: "0|1"}
    assert bind_env({}, [4, 5, 6, 7, 0, 1, 2, 3], nodes=1, workers=4) == {BIND_ENV: "0,1|2,3|4,5|6,7"}
    assert bind_env({}, [0, 1, 2], nodes=1, workers=2) == {BIND_ENV: "0|1"}, "a spare core is left to the scheduler"
    assert bind_env({}, [0, 1, 2, 3], nodes=2, workers=2) == {}, "a node each: vLLM's own binding"
    assert bind_env({BIND_ENV: "nobind"}, [0, 1], nodes=1, workers=2) == {}, "the operator's choice wins"
    assert local_workers(2, 1, 1) == 2 and local_workers(1, 2, 2) == 4
    with pytest.raises(CoresError, match="need at least 4 usable cores"):
        bind_env({}, [0, 1], nodes=1, workers=4)


def test_eager_pipeline_parallel_is_stopped_at_start_up_with_the_fix():
    assert "--no-enforce-eager" in pipeline_eager_problem(2, True)
    assert pipeline_eager_problem(2, False) is None and pipeline_eager_problem(1, True) is None
