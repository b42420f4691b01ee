"""Proxy weights: reading HF safetensors, the perturbed copies θ ± εg, and the fused layout the
forward pass runs on.

The fused layout concatenates q/k/v and gate/up so a layer is four matmuls, and every tensor has a
leading *copy* dimension so the perturbed copies run in one batched pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from antidistill.proxy_worker.core.config import ProxyConfig
from antidistill.proxy_worker.core.delta_mode import DeltaMode
from safetensors import SafetensorError, safe_open

Params = dict[str, torch.Tensor]
T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype the proxy's copies are stored in, from its settings name."""
    if name not in DTYPES:
        raise ValueError(f"unknown proxy dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


class WeightsError(ValueError):
    """A weights or gradient file does not fit the proxy it is used with."""


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The shard list of a HF checkpoint directory (single file or ``*.index.json``)."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / s for s in shards]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise WeightsError(f"{root}: no model.safetensors or model.safetensors.index.json")


def read_safetensors(paths: Sequence[str | Path]) -> dict[str, torch.Tensor]:
    """All tensors of the given files; a missing or corrupt file is a WeightsError naming it."""
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
            raise WeightsError(f"{path}: cannot read safetensors ({exc})") from exc
    return tensors


def expected_shapes(cfg: ProxyConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter name (HF naming) of the proxy and its shape; biases are handled separately."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
        if cfg.family == "qwen2":
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
        if cfg.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


Shapes = Mapping[str, tuple[int, ...]]


def check_shapes(found: Shapes, expected: Shapes, what: str) -> None:
    """Raise WeightsError naming the first missing, misshapen or extra tensor (names and shapes
    only, so a file's header is enough: start-up pre-flight and loading say the same thing)."""
    for name, shape in expected.items():
        if name not in found:
            raise WeightsError(f"{what}: missing tensor {name!r}")
        if tuple(found[name]) != tuple(shape):
            raise WeightsError(f"{what}: tensor {name!r} has shape {tuple(found[name])}, expected {tuple(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise WeightsError(f"{what}: unexpected tensor {extra[0]!r} (not a proxy parameter)")


def check_tensors(tensors: Mapping[str, torch.Tensor], expected: Shapes, what: str) -> None:
    """``check_shapes``, then the first non-finite tensor."""
    check_shapes({name: tuple(t.shape) for name, t in tensors.items()}, expected, what)
    for name in expected:
        if not torch.isfinite(tensors[name]).all():
            raise WeightsError(f"{what}: tensor {name!r} contains non-finite values")


def proxy_parameters(tensors: dict[str, T], cfg: ProxyConfig) -> dict[str, T]:
    """A checkpoint's entries (tensors or shapes) that are proxy parameters: a tied model may also
    carry ``lm_head.weight``, which IS the embedding, so it is dropped and names match what
    gradients are computed for."""
    if cfg.tie_word_embeddings:
        return {name: v for name, v in tensors.items() if name != "lm_head.weight"}
    return tensors


def load_proxy_state(model_dir: str | Path, cfg: ProxyConfig) -> dict[str, torch.Tensor]:
    """The proxy's parameters (``proxy_parameters``) in fp32, checked against its config."""
    tensors = proxy_parameters(read_safetensors(safetensors_files(model_dir)), cfg)
    check_tensors(tensors, expected_shapes(cfg), f"proxy weights in {model_dir}")
    return {k: v.to(torch.float32) for k, v in tensors.items()}


def perturbed_copies(
    theta: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor] | None,
    scales: Sequence[float],
) -> list[dict[str, torch.Tensor]]:
    """θ + s·direction for each scale s, formed in fp32 (the caller casts afterwards)."""
    copies = []
    for s in scales:
        if direction is None or s == 0:
            copies.append({k: v.to(torch.float32) for k, v in theta.items()})
        else:
            copies.append({k: v.to(torch.float32) + s * direction[k].to(torch.float32) for k, v in theta.items()})
    return copies


def gradient_shapes(cfg: ProxyConfig, mode: DeltaMode) -> dict[str, tuple[int, ...]]:
    """The tensors (HF naming) a gradient file of ``mode`` holds: every parameter for ``full``, else
    those the mode covers, with the output head always untied (``delta_mode.py``)."""
    shapes = expected_shapes(cfg)
    if not mode.restricted:
        return shapes
    mode.first_perturbed_layer(cfg.num_layers)  # a mode the proxy is too shallow for is an error here
    kept = {name: shape for name, shape in shapes.items() if mode.covers(name, cfg.num_layers)}
    return kept | {"lm_head.weight": (cfg.vocab_size, cfg.hidden_size)}


def with_untied_head(theta: Mapping[str, torch.Tensor], cfg: ProxyConfig) -> dict[str, torch.Tensor]:
    """θ with an explicit ``lm_head.weight``: a tied proxy's head becomes its own copy of the embedding,
    so a restricted mode's g can move the head without moving the trunk's input embedding."""
    out = dict(theta)
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def padded_direction(
    theta: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor], cfg: ProxyConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(θ, g) with the same names: a restricted mode's g gets zeros where it has no tensor, and a tied
    θ an untied head where g has one, so a one-copy JVP (``delta.exact_delta``) runs along any mode's g."""
    if "lm_head.weight" in grad:
        theta = with_untied_head(theta, cfg)
    return dict(theta), {k: grad[k] if k in grad else torch.zeros_like(v) for k, v in theta.items()}


def fused_layout(cfg: ProxyConfig, qkv_bias: bool, separate_head: bool | None = None) -> dict[str, list[str]]:
    """Fused tensor name → the HF tensors concatenated along dim 0 to form it (q/k/v, gate/up).
    ``separate_head`` (default: the config's untied head) gives the head its own entry."""
    layout = {"embed": ["model.embed_tokens.weight"], "norm": ["model.norm.weight"]}
    if separate_head if separate_head is not None else not cfg.tie_word_embeddings:
        layout["lm_head"] = ["lm_head.weight"]
    for n in range(cfg.num_layers):
        p, a, m = f"model.layers.{n}.", f"model.layers.{n}.self_attn.", f"model.layers.{n}.mlp."
        out = f"layers.{n}."
        layout[out + "attn_norm"] = [p + "input_layernorm.weight"]
        layout[out + "mlp_norm"] = [p + "post_attention_layernorm.weight"]
        layout[out + "qkv"] = [a + f"{x}_proj.weight" for x in "qkv"]
        if qkv_bias:
            layout[out + "qkv_bias"] = [a + f"{x}_proj.bias" for x in "qkv"]
        layout[out + "o"] = [a + "o_proj.weight"]
        layout[out + "gate_up"] = [m + "gate_proj.weight", m + "up_proj.weight"]
        layout[out + "down"] = [m + "down_proj.weight"]
        if cfg.qk_norm:
            layout[out + "q_norm"] = [a + "q_norm.weight"]
            layout[out + "k_norm"] = [a + "k_norm.weight"]
    return layout


def _gather(state: Mapping[str, torch.Tensor], parts: Sequence[str]) -> torch.Tensor:
    return state[parts[0]] if len(parts) == 1 else torch.cat([state[n] for n in parts], dim=0)


def _layout_for(state: Mapping[str, torch.Tensor], cfg: ProxyConfig) -> dict[str, list[str]]:
    return fused_layout(cfg, "model.layers.0.self_attn.q_proj.bias" in state, "lm_head.weight" in state)


def _tie(stacked: Params) -> Params:
    """Tied embeddings stay one tensor (``lm_head`` aliases ``embed``), as in the HF model, unless
    the head was untied (``with_untied_head``)."""
    if "lm_head" not in stacked:
        stacked["lm_head"] = stacked["embed"]
    return stacked


def stack_copies(copies: Sequence[Mapping[str, torch.Tensor]], cfg: ProxyConfig, dtype: torch.dtype) -> Params:
    """Fuse each (HF-named) copy, cast, and stack along a new leading copy dimension.

    Differentiable, so the gradient tool runs the forward pass on it with θ as autograd leaves.
    """
    layout = _layout_for(copies[0], cfg)
    return _tie({k: torch.stack([_gather(c, parts) for c in copies]).to(dtype) for k, parts in layout.items()})


def stack_perturbed(
    theta: Mapping[str, torch.Tensor],
    direction: Mapping[str, torch.Tensor],
    scales: Sequence[float],
    cfg: ProxyConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> Params:
    """θ + s·direction for each scale, formed in fp32 (or fp64 for fp64), cast to ``dtype``, stacked,
    moved to ``device``.

    Built one fused tensor at a time: peak host memory is θ and g plus one tensor's copies, instead of
    whole fp32 copies of the model (≈ 3× less for a 3B proxy), and the device only ever holds the result.
    A tensor ``direction`` lacks (a restricted Δ mode's g) is the same in every copy, so it is held
    once (copy dimension 1) and the forward pass broadcasts it; a head it has is untied.
    """
    if "lm_head.weight" in direction:
        theta = with_untied_head(theta, cfg)
    wide = torch.promote_types(dtype, torch.float32)  # fp64 copies (ground-truth runs) are formed in fp64
    out: Params = {}
    for key, parts in _layout_for(theta, cfg).items():
        base = _gather(theta, parts).to(wide)
        covered = [name in direction for name in parts]
        if not any(covered):
            out[key] = base.to(dtype)[None].to(device)
            continue
        if not all(covered):
            raise WeightsError(f"gradient covers only part of the fused tensor {key!r} ({parts})")
        step = _gather(direction, parts).to(wide)
        out[key] = torch.stack([(base + s * step).to(dtype) for s in scales]).to(device)
    return _tie(out)
