"""Rotary position embeddings (the "rotate half" layout Hugging Face uses for these families)."""

from __future__ import annotations

import math
from typing import Any

import torch
from antidistill.proxy_worker.core.config import ProxyConfig, ProxyConfigError


def _rope_settings(raw: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(theta, scaling dict) from either the classic or the newer ``rope_parameters`` spelling."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    merged = {**params, **scaling}
    return float(theta), merged


def inverse_frequencies(cfg: ProxyConfig) -> torch.Tensor:
    """Per-pair rotation frequencies in fp32, including supported context-extension scalings."""
    theta, scaling = _rope_settings(cfg.raw)
    dim = cfg.head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaling(inv_freq, scaling)
    else:
        raise ProxyConfigError(f"config.json: rope scaling type {kind!r} is not supported")
    return inv_freq.to(torch.float32)


def _llama3_scaling(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor = float(s["factor"])
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """cos/sin rows looked up by absolute position; grows on demand so long contexts never fail."""

    def __init__(self, cfg: ProxyConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = inverse_frequencies(cfg).to(device)
        self.cos = torch.empty(0, cfg.head_dim, device=device)
        self.sin = torch.empty(0, cfg.head_dim, device=device)
        self._grow(max(cfg.max_position_embeddings, 1))

    def _grow(self, length: int) -> None:
        pos = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [N, head_dim] for the given positions, in the activation dtype."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.cos.shape[0]:
            self._grow(max(needed, 2 * self.cos.shape[0]))
        return self.cos[positions].to(dtype), self.sin[positions].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [..., N, heads, head_dim] by per-token angles ``cos``/``sin`` [N, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
