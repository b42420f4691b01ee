"""The gradient file g: safetensors with exactly the proxy's parameter names, plus metadata.

A gradient that does not belong to the proxy (another architecture, a missing or extra tensor, a
wrong shape, NaN/inf) must stop start-up with a message naming the first mismatch: serving with
a wrong g silently protects nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from antidistill.proxy_worker.core.config import ProxyConfig
from antidistill.proxy_worker.core.strength import check_scale
from antidistill.proxy_worker.core.weights import (
    WeightsError,
    check_shapes,
    check_tensors,
    expected_shapes,
    read_safetensors,
)
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_HASH_KEY = "proxy_config_hash"
DELTA_SCALE_KEY = "delta_scale"  # core/strength.py: what turns a tier's strength into λ


def save_gradient(path: str | Path, grad: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> None:
    """Write g (fp32, contiguous) with string metadata; the parent folder is created."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in grad.items()}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_delta_scale(path: str | Path) -> float | None:
    """The Δ scale stored in a gradient file (None: a file written before scales were stored);
    WeightsError for an unreadable file or a stored value that is not a finite number > 0."""
    try:
        raw = read_metadata(path).get(DELTA_SCALE_KEY)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"gradient {path}: cannot read safetensors ({exc})") from None
    if raw is None:
        return None
    try:
        return check_scale(float(raw), DELTA_SCALE_KEY)
    except ValueError:
        message = f"gradient {path}: metadata {DELTA_SCALE_KEY} must be a finite number > 0, got {raw!r}"
        raise WeightsError(message) from None


def check_gradient_header(path: str | Path, cfg: ProxyConfig) -> None:
    """Names, shapes and config hash of g without reading its values (fast pre-flight check)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"gradient {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            stored_hash = (f.metadata() or {}).get(CONFIG_HASH_KEY)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"gradient {path}: cannot read safetensors ({exc})") from None
    if stored_hash is not None and stored_hash != cfg.digest:
        raise WeightsError(f"gradient {path}: computed for proxy config {stored_hash}, but this proxy is {cfg.digest}")
    check_shapes(shapes, expected_shapes(cfg), f"gradient {path}")


def load_gradient(path: str | Path, cfg: ProxyConfig) -> dict[str, torch.Tensor]:
    """Read g and check it against the proxy config (the header first, then every value is finite);
    raises WeightsError naming the problem."""
    check_gradient_header(path, cfg)
    grad = read_safetensors([path])
    check_tensors(grad, expected_shapes(cfg), f"gradient {path}")
    return {k: v.to(torch.float32) for k, v in grad.items()}
