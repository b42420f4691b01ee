"""One shape check for proxy weights and gradients: the start-up pre-flight (headers only) and the
worker's load (values) reject the same defects with the same message."""

from __future__ import annotations

import shutil

import pytest
import torch
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.gradient_file import check_gradient_header, load_gradient
from antidistill.proxy_worker.core.weights import (
    WeightsError,
    check_shapes,
    load_proxy_state,
    read_safetensors,
    safetensors_files,
)
from antidistill.server.startup.preflight import check_proxy_weights
from safetensors.torch import save_file

DEFECTS = {
    "missing": (
        lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
        "missing tensor 'model.layers.1.mlp.up_proj.weight'",
    ),
    "shape": (
        lambda t: t.__setitem__("model.norm.weight", torch.ones(3)),
        "'model.norm.weight' has shape (3,), expected",
    ),
    "extra": (lambda t: t.__setitem__("model.extra.weight", torch.ones(2)), "unexpected tensor 'model.extra.weight'"),
}


def test_check_shapes_names_the_first_problem():
    expected = {"a": (2, 3), "b": (4,)}
    check_shapes({"b": (4,), "a": (2, 3)}, expected, "x")
    for found, needle in [
        ({"b": (4,)}, "x: missing tensor 'a'"),
        ({"a": (3, 2), "b": (4,)}, "x: tensor 'a' has shape (3, 2), expected (2, 3)"),
        ({"a": (2, 3), "b": (4,), "c": (1,)}, "x: unexpected tensor 'c' (not a proxy parameter)"),
    ]:
        with pytest.raises(WeightsError) as err:
            check_shapes(found, expected, "x")
        assert str(err.value) == needle


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_preflight_and_load_reject_a_proxy_alike(model_dir, tmp_path, defect):
    source = model_dir("llama")
    broken = shutil.copytree(source, tmp_path / "proxy")
    tensors = read_safetensors(safetensors_files(broken))
    mutate, needle = DEFECTS[defect]
    mutate(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(broken / "model.safetensors"))
    cfg = load_config(broken)
    with pytest.raises(WeightsError) as at_start:
        check_proxy_weights(safetensors_files(broken), cfg)
    with pytest.raises(WeightsError) as at_load:
        load_proxy_state(broken, cfg)
    assert needle in str(at_start.value) and needle in str(at_load.value)
    assert str(at_start.value).startswith("--proxy ")


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_preflight_accepts_good_proxies(model_dir, shard):
    for path in (model_dir("llama", shard=shard), model_dir("llama", tie=True, shard=shard)):
        check_proxy_weights(safetensors_files(path), load_config(path))


def test_a_tied_checkpoint_may_carry_its_head(model_dir, tmp_path):
    """A tied model's lm_head.weight IS the embedding: not an extra tensor, at start-up or at load."""
    tied = shutil.copytree(model_dir("llama", tie=True), tmp_path / "tied")
    tensors = read_safetensors(safetensors_files(tied))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(tied / "model.safetensors"))
    cfg = load_config(tied)
    check_proxy_weights(safetensors_files(tied), cfg)
    assert "lm_head.weight" not in load_proxy_state(tied, cfg)


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_gradient_header_and_load_reject_alike(model_dir, tmp_path, defect):
    path = model_dir("llama")
    cfg = load_config(path)
    grad = {k: torch.zeros_like(v) for k, v in load_proxy_state(path, cfg).items()}
    mutate, needle = DEFECTS[defect]
    mutate(grad)
    out = tmp_path / "g.safetensors"
    save_file({k: v.contiguous() for k, v in grad.items()}, str(out))
    for check in (check_gradient_header, load_gradient):
        with pytest.raises(WeightsError) as err:
            check(out, cfg)
        assert needle in str(err.value) and str(err.value).startswith(f"gradient {out}")
