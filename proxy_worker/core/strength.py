"""Strength: λ in units an operator can carry from one gradient to the next.

λ multiplies Δ, and Δ's size follows the gradient's norm: the same λ means a gentle nudge with one
gradient file and gibberish with another. The Δ scale s of a gradient is the mean, over completion
positions of its holdout traces, of Δ's standard deviation across the vocabulary (the exact
directional derivative, so ε plays no part). A strength b = λ·s says how many of Δ's standard
deviations are added to the logits; λ = b / s for a profile whose scale is s. The gradient tool
stores s in the gradient file's metadata (``gradient_file.DELTA_SCALE_KEY``); ``delta.delta_scale``
computes it. No torch here: the gateway reads tiers without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

ADD_SCALE = "antidistill gradient --add-scale --proxy {proxy} --traces HOLDOUT.jsonl --out {gradient}"


def check_scale(scale: float, where: str) -> float:
    """``scale`` if it can divide a strength (finite, > 0), else ValueError naming ``where``."""
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{where}: Δ scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def lambda_for(strength: float, scale: float) -> float:
    """λ that adds ``strength`` standard deviations of Δ, for a gradient of Δ scale ``scale``."""
    return strength / scale


def strength_of(lam: float, scale: float) -> float:
    """The strength that λ amounts to on a gradient of Δ scale ``scale``."""
    return lam * scale


@dataclass(frozen=True)
class ProfileScales:
    """The Δ scale of each loaded gradient profile (None: its file stores none), and which profile
    a tier without ``profile:`` is served with: what turns a tier's strength into its λ."""

    scales: Mapping[str, float | None] = field(default_factory=dict)
    default: str | None = None
    gradients: Mapping[str, str] = field(default_factory=dict)  # profile → gradient file (for the hint)
    proxy: str = "PROXY"

    def profile(self, name: str | None) -> str | None:
        return name or self.default

    def scale(self, profile: str | None) -> float | None:
        """The Δ scale of ``profile`` (None: the default profile), None if it is not known."""
        return self.scales.get(self.profile(profile) or "")

    def strength(self, lam: float | None, profile: str | None) -> float | None:
        """What λ amounts to on ``profile``; None when λ or the scale is unknown."""
        scale = self.scale(profile)
        return None if lam is None or scale is None else strength_of(lam, scale)

    def missing_hint(self, profile: str | None) -> str:
        """How to store the scale of ``profile``'s gradient (one line, for a start-up error)."""
        gradient = self.gradients.get(self.profile(profile) or "", "GRADIENT.safetensors")
        return "store it with `" + ADD_SCALE.format(proxy=self.proxy, gradient=gradient) + "`"

    def to_json(self) -> dict[str, object]:
        return {
            "scales": dict(self.scales),
            "default": self.default,
            "gradients": dict(self.gradients),
            "proxy": self.proxy,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> ProfileScales:
        """The inverse of ``to_json``; ValueError for a scale that is not a finite number > 0."""
        scales, gradients = raw.get("scales") or {}, raw.get("gradients") or {}
        if not isinstance(scales, Mapping) or not isinstance(gradients, Mapping):
            raise ValueError("profile scales: expected objects of profile → scale and profile → gradient")
        checked = {str(k): None if v is None else check_scale(v, f"profile {k}") for k, v in scales.items()}
        default = raw.get("default")
        return cls(
            checked,
            None if default is None else str(default),
            {str(k): str(v) for k, v in gradients.items()},
            str(raw.get("proxy") or cls.proxy),
        )
