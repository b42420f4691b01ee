"""Every bad-input class stops start-up with an error naming the first mismatch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from antidistill.benchmarks.tiny.models import CORPUS, train_tokenizer
from antidistill.proxy_worker.core.config import ProxyConfigError, load_config
from antidistill.proxy_worker.core.gradient_file import CONFIG_HASH_KEY, save_gradient
from antidistill.proxy_worker.core.weights import WeightsError, load_proxy_state
from antidistill.proxy_worker.runtime.engine import ProxyEngine
from antidistill.proxy_worker.runtime.vocabulary import (
    VocabularyMismatch,
    check_proxy_matches_teacher,
    check_vocab_alignment,
)
from safetensors.torch import save_file


@pytest.fixture()
def proxy(model_dir):
    return model_dir("llama")


def good_gradient(path):
    cfg = load_config(path)
    return cfg, {k: torch.full_like(v, 0.01) for k, v in load_proxy_state(path, cfg).items()}


def start(proxy, grad_path):
    return ProxyEngine.from_files(proxy, grad_path, epsilon=0.01, token_budget=64)


def test_good_gradient_starts(proxy, tmp_path):
    cfg, grad = good_gradient(proxy)
    save_gradient(tmp_path / "g.safetensors", grad, {CONFIG_HASH_KEY: cfg.digest})
    assert start(proxy, tmp_path / "g.safetensors").model.copies == 2


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda g: g.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'model.layers.1.mlp.up_proj.weight'"),
        (lambda g: g.__setitem__("model.extra.weight", torch.zeros(2)), "unexpected tensor 'model.extra.weight'"),
        (lambda g: g.__setitem__("model.norm.weight", torch.zeros(3)), "'model.norm.weight' has shape (3,)"),
        (
            lambda g: g["model.layers.0.self_attn.k_proj.weight"].view(-1).__setitem__(5, float("nan")),
            "'model.layers.0.self_attn.k_proj.weight' contains non-finite",
        ),
    ],
    ids=["missing", "extra", "shape", "nan"],
)
def test_bad_gradient_names_first_mismatch(proxy, tmp_path, mutate, needle):
    _cfg, grad = good_gradient(proxy)
    mutate(grad)
    save_file({k: v.contiguous() for k, v in grad.items()}, str(tmp_path / "g.safetensors"))
    with pytest.raises(WeightsError) as err:
        start(proxy, tmp_path / "g.safetensors")
    assert needle in str(err.value) and "g.safetensors" in str(err.value)


def test_gradient_of_another_proxy_is_rejected(proxy, tmp_path):
    _cfg, grad = good_gradient(proxy)
    save_gradient(tmp_path / "g.safetensors", grad, {CONFIG_HASH_KEY: "0123456789abcdef"})
    with pytest.raises(WeightsError, match="computed for proxy config 0123456789abcdef"):
        start(proxy, tmp_path / "g.safetensors")


def test_missing_gradient_file(proxy, tmp_path):
    with pytest.raises(WeightsError, match="file not found"):
        start(proxy, tmp_path / "nope.safetensors")


def test_bad_proxy_files(proxy, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(proxy, broken)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ProxyConfigError, match="model_type 'gpt2' is not supported"):
        load_config(broken)
    (broken / "config.json").write_text(json.dumps(cfg))
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(WeightsError, match="cannot read safetensors"):
        load_proxy_state(broken, load_config(broken))


def test_tokenizers_that_line_up_pass(proxy, tokenizer):
    check_proxy_matches_teacher(str(proxy), str(proxy), len(tokenizer), len(tokenizer) + 64)


def test_tokenizer_mismatch_names_first_token(tokenizer):
    other = train_tokenizer(corpus=[s.upper() for s in CORPUS])
    with pytest.raises(VocabularyMismatch, match=r"token id \d+: proxy has .*, teacher has"):
        check_vocab_alignment(tokenizer, other, len(tokenizer), len(other))


def test_proxy_vocabulary_wider_than_teacher(tokenizer):
    with pytest.raises(
        VocabularyMismatch, match=r"proxy vocabulary \(320\) is wider than the teacher's logits \(300\)"
    ):
        check_vocab_alignment(tokenizer, tokenizer, 320, 300)
    small = train_tokenizer(vocab_size=300)
    with pytest.raises(VocabularyMismatch, match="teacher's tokenizer ends at 300"):
        check_vocab_alignment(tokenizer, small, 320, 400)
