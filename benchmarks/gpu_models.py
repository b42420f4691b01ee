"""The random-weight models the GPU check measures: published shapes (the step's cost depends on the
shape, not the values), tiny smoke shapes that run in seconds on a CPU, and the two proxy copies
θ ± εg made on the device, so no host copy of a 7B model is ever needed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from antidistill.proxy_worker.core.config import ProxyConfig, parse_config
from antidistill.proxy_worker.core.weights import expected_shapes, fused_layout

EPSILON = 1e-2
TEACHER_SHAPE = dict(  # Qwen2.5-7B's published shape: the teacher whose step the proxy rides on
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
)
SMOKE_SHAPES = {
    "smoke-proxy": dict(
        model_type="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    )
}
SMOKE_TEACHER = {**SMOKE_SHAPES["smoke-proxy"], "hidden_size": 128, "num_attention_heads": 8}
SMOKE_TEACHER["tie_word_embeddings"] = False


def shape_config(raw: dict, max_positions: int) -> ProxyConfig:
    """The proxy config of a raw shape, with room for ``max_positions`` tokens."""
    return parse_config({**raw, "max_position_embeddings": max_positions}, raw.get("model_type", "?"))


def random_params(
    cfg: ProxyConfig, scales: Sequence[float], dtype: torch.dtype, device: str, seed: int
) -> dict[str, torch.Tensor]:
    """θ + s·g for each scale s, random θ and g in the fused layout, made on the device one tensor at a
    time (no host copy of a 7B model); norms start at 1 as in a trained model."""
    shapes = expected_shapes(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, parts in fused_layout(cfg, qkv_bias=cfg.family == "qwen2").items():
        shape = (sum(shapes[p][0] for p in parts), *shapes[parts[0]][1:])
        theta = torch.randn(shape, generator=gen, device=device) * 0.02
        if name.endswith("norm"):
            theta += 1.0
        grad = torch.randn(shape, generator=gen, device=device) * 0.02
        out[name] = torch.stack([(theta + s * grad).to(dtype) for s in scales])
        del theta, grad
    if cfg.tie_word_embeddings:
        out["lm_head"] = out["embed"]
    return out


def cast_params(params: dict[str, torch.Tensor], dtype: torch.dtype, tied: bool) -> dict[str, torch.Tensor]:
    """The same copies in another dtype (θ ± εg formed in fp32, then cast, as serving does)."""
    out = {k: v.to(dtype) for k, v in params.items() if not (tied and k == "lm_head")}
    if tied:
        out["lm_head"] = out["embed"]
    return out
