"""Shared fixtures: tiny random models written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import save_tiny, train_tokenizer

torch.set_num_threads(2)


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
