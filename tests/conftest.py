"""Shared fixtures (tiny random models written once per session) and the test markers.

Every test gets one of two markers: ``engine`` if it starts a real vLLM engine or server (it uses a
fixture made with ``tests.helpers.engine_fixture``, or is marked ``engine`` itself), else ``unit``.
``pytest -m unit`` is the quick loop; ``pytest`` runs everything; ``-m "not slow"`` skips the few
tests that take minutes on their own."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from antidistill.benchmarks.tiny.models import save_tiny, train_tokenizer

torch.set_num_threads(2)


def fixture_functions(item: pytest.Item) -> list[object]:
    """The functions of every fixture the test depends on, directly or through other fixtures."""
    info = getattr(item, "_fixtureinfo", None)  # the closure pytest resolved for this test
    return [defs[-1].func for defs in info.name2fixturedefs.values() if defs] if info else []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = fixture_functions(item)
        if any(getattr(f, "slow", False) for f in fixtures) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("engine") is not None:
            continue
        engine = any(getattr(f, "starts_engine", False) for f in fixtures)
        item.add_marker(pytest.mark.engine if engine else pytest.mark.unit)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer):
    """Factory: ``model_dir(family, **kw)`` → a saved tiny model, cached per argument set."""
    made: dict[tuple, Path] = {}

    def make(family: str = "llama", **kw: object) -> Path:
        key = (family, *sorted(kw.items()))
        if key not in made:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            made[key] = save_tiny(path, family, vocab_size=len(tokenizer), tokenizer=tokenizer, **kw)
        return made[key]

    return make


@pytest.fixture(autouse=True)
def logging_enabled() -> Iterator[None]:
    """vLLM's ``suppress_logging`` (around building its parser's DeviceConfig) disables INFO logging
    and never turns it back on if the build raises (a CUDA wheel on a machine without a GPU): one such
    test would silence every later test's audit lines."""
    yield
    logging.disable(logging.NOTSET)
