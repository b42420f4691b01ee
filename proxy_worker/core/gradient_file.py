"""The gradient file g: safetensors with exactly the parameter names its Δ mode covers, plus metadata.

The metadata says the mode (``delta_mode``; a file without it is ``full``, written before modes
existed) and the file's tensors must be exactly that mode's (``weights.gradient_shapes``).

A gradient that does not belong to the proxy (another architecture, a missing or extra tensor, a
wrong shape, NaN/inf) must stop start-up with a message naming the first mismatch: serving with
a wrong g silently protects nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from antidistill.proxy_worker.core.config import ProxyConfig
from antidistill.proxy_worker.core.delta_mode import DeltaMode
from antidistill.proxy_worker.core.strength import check_scale
from antidistill.proxy_worker.core.weights import (
    WeightsError,
    check_shapes,
    check_tensors,
    gradient_shapes,
    read_safetensors,
)
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG_HASH_KEY = "proxy_config_hash"
DELTA_SCALE_KEY = "delta_scale"  # core/strength.py: what turns a tier's strength into λ
DELTA_MODE_KEY = "delta_mode"  # core/delta_mode.py: which parameters g covers


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


def check_gradient_header(path: str | Path, cfg: ProxyConfig, mode: DeltaMode | None = None) -> DeltaMode:
    """Names, shapes, config hash and Δ mode of g without reading its values (fast pre-flight
    check); returns the file's mode. ``mode``: the one the profile names, which the file must have."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"gradient {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"gradient {path}: cannot read safetensors ({exc})") from None
    stored_hash = meta.get(CONFIG_HASH_KEY)
    if stored_hash is not None and stored_hash != cfg.digest:
        raise WeightsError(f"gradient {path}: computed for proxy config {stored_hash}, but this proxy is {cfg.digest}")
    try:
        found = DeltaMode.parse(meta.get(DELTA_MODE_KEY))
        expected = gradient_shapes(cfg, found)
    except ValueError as exc:
        raise WeightsError(f"gradient {path}: {exc}") from None
    if mode is not None and mode != found:
        raise WeightsError(f"gradient {path}: written for Δ mode {found}, but its profile names {mode}")
    check_shapes(shapes, expected, f"gradient {path}")
    return found


def load_gradient(path: str | Path, cfg: ProxyConfig, mode: DeltaMode | None = None) -> dict[str, torch.Tensor]:
    """Read g and check it against the proxy config and ``mode`` (the header first, then every value
    is finite); raises WeightsError naming the problem."""
    found = check_gradient_header(path, cfg, mode)
    grad = read_safetensors([path])
    check_tensors(grad, gradient_shapes(cfg, found), f"gradient {path}")
    return {k: v.to(torch.float32) for k, v in grad.items()}
