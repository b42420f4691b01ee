"""The proxy's linear layers in the layout the CPU GEMM library wants: oneDNN weights reordered
once at load time (what vLLM's own CPU linears do through ``onednn_mm``), so a decode step does
not re-block the weights on every call.

``torch.matmul`` on a transposed weight view re-packs W for each call; for the small-N GEMMs of
a decode step that packing is a large share of the time (the lm_head most of all: V × H weights
for a few dozen rows). torch ships the same oneDNN prepack vLLM uses (``mkldnn._reorder_linear_weight``
/ ``mkldnn._linear_pointwise``), so this module needs no vLLM and runs wherever torch has oneDNN.

Not the serving default: oneDNN caches a primitive per input shape, and a served step's row count
changes all the time. Measured on this CPU: 396 row counts through two packed linears grew the
process by ≈ 1 GB (≈ 3.7 GB on a second pass), and a 2-minute soak of the served worker grew
58–137 MiB against 26 MiB with plain matmuls, for ≈ 10 % more λ>0 throughput at 32 streams (71.9 vs
65.5 tok/s, two runs). Selectable for fixed-shape use (benchmarks) until the shapes are bounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

GemmPath = Literal["matmul", "packed"]
GEMM_PATHS: tuple[GemmPath, ...] = ("matmul", "packed")

LINEAR_NAMES = ("qkv", "o", "gate_up", "down")
"""Per-layer linear weights (``layers.{i}.{name}``); the ``lm_head`` is packed too."""


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN prepacking applies to fp32 weights on a CPU whose torch build has oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def use_packed(path: GemmPath, device: torch.device, dtype: torch.dtype) -> bool:
    """Resolve ``path``; "packed" where packing does not apply is an error."""
    if path not in GEMM_PATHS:
        raise ValueError(f"gemm must be one of {GEMM_PATHS}, got {path!r}")
    if path == "packed" and not packing_available(device, dtype):
        raise ValueError(f"packed GEMMs need fp32 weights on a CPU with oneDNN (got {dtype} on {device})")
    return path == "packed"


class PackedLinear:
    """``x @ W.T + b`` per copy with W prepacked: x [C, N, in] → [C, N, out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weights = [torch.ops.mkldnn._reorder_linear_weight(w.contiguous()) for w in weight]
        self.biases = [None] * len(self.weights) if bias is None else [b.contiguous() for b in bias]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [C or 1, N, in]: one shared input (a trunk's single copy) broadcasts to every copy."""
        outs = [
            torch.ops.mkldnn._linear_pointwise(x[c if x.shape[0] > 1 else 0], w, b, "none", [], "")
            for c, (w, b) in enumerate(zip(self.weights, self.biases, strict=True))
        ]
        return torch.stack(outs)

    @property
    def nbytes(self) -> int:
        tensors = [*self.weights, *(b for b in self.biases if b is not None)]
        return sum(t.numel() * t.element_size() for t in tensors)


def linear_names(num_layers: int) -> list[str]:
    return [f"layers.{i}.{name}" for i in range(num_layers) for name in LINEAR_NAMES] + ["lm_head"]


def pack_linears(params: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, PackedLinear]:
    """Every linear of the proxy, prepacked (with its bias where the checkpoint has one)."""
    return {name: PackedLinear(params[name], params.get(name + "_bias")) for name in linear_names(num_layers)}
