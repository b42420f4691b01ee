"""The CPU settings ``antidistill serve`` adds before vLLM starts: all cores to the model worker on
a small box, an allocator that keeps freed memory; an operator's own choice is never overridden."""

from __future__ import annotations

import os

import pytest
from antidistill.server.startup.cpu_platform import RESERVED_ENV, TUNABLES_ENV, apply_engine_env, engine_env


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
