"""Δ modes: which of the proxy's parameters g covers, and so which layers must run twice.

Δ is a directional derivative, Δ(v) = ⟨g, ∇θ log p(v | x; θ)⟩, so it splits exactly over parameter
groups; restricting g to the last layers gives their share of the full Δ, and the layers g does not
touch are the same in both perturbed copies. Those run once and hold their KV once:

- ``full``: g on every parameter (the paper's design): both copies run every layer.
- ``last:K``: g on the last K transformer blocks, the final norm and the output head: the first
  L − K blocks run once.
- ``head``: g on the output head alone: the whole trunk runs once, only the head's matmul twice.

The restricted modes perturb an *untied* head: a tied-embedding proxy (SmolLM2, Gemma-3) gets its own
copy of the embedding as the head, so the trunk's input embedding is never perturbed. Whether a mode
keeps the protection is measured, not assumed (``benchmarks/delta_modes.py``).

Torch-free: the processor settings validate mode names before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["full", "last", "head"]
FULL_NAME = "full"


@dataclass(frozen=True)
class DeltaMode:
    """A mode: ``kind`` and, for ``last``, the number of trailing blocks g covers."""

    kind: Kind = "full"
    blocks: int = 0

    @classmethod
    def parse(cls, text: str | None) -> DeltaMode:
        """``full``, ``head`` or ``last:K`` (K ≥ 1); None is ``full`` (files and profiles that predate modes)."""
        if text is None or text == FULL_NAME:
            return cls()
        if text == "head":
            return cls("head")
        kind, _, count = text.partition(":")
        if kind == "last" and count.isdigit() and int(count) >= 1:
            return cls("last", int(count))
        raise ValueError(f"unknown Δ mode {text!r}; expected 'full', 'head' or 'last:K' with K ≥ 1")

    def __str__(self) -> str:
        return f"last:{self.blocks}" if self.kind == "last" else self.kind

    @property
    def restricted(self) -> bool:
        return self.kind != "full"

    def first_perturbed_layer(self, num_layers: int) -> int:
        """The first block both copies run: 0 (full), L − K (last:K), L (head: none)."""
        if self.kind == "full":
            return 0
        if self.kind == "head":
            return num_layers
        if self.blocks > num_layers:
            raise ValueError(f"Δ mode {self} needs {self.blocks} blocks, but the proxy has {num_layers}")
        return num_layers - self.blocks

    def layer_copies(self, num_layers: int) -> list[int]:
        """Weight (and KV) copies per block: 1 where g is zero, 2 where the perturbed copies differ."""
        first = self.first_perturbed_layer(num_layers)
        return [1 if layer < first else 2 for layer in range(num_layers)]

    def covers(self, name: str, num_layers: int) -> bool:
        """Whether g has the HF-named parameter ``name`` (the untied ``lm_head.weight`` included)."""
        if self.kind == "full":
            return True
        if name == "lm_head.weight":
            return True
        if name == "model.norm.weight":
            return self.kind == "last"
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) >= self.first_perturbed_layer(num_layers)
        return False


FULL = DeltaMode()  # the paper's: g on every parameter
