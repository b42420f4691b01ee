"""Architecture description of a proxy model, read from a Hugging Face ``config.json``.

Only the decoder-only families whose layers we implement are accepted; anything else stops
start-up with a message naming the field, instead of silently computing the wrong function.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class ProxyConfigError(ValueError):
    """The proxy's config.json describes a model this engine cannot run."""


@dataclass(frozen=True)
class ProxyConfig:
    """Shapes and constants of one proxy transformer."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_window: int | None
    qk_norm: bool
    raw: dict[str, Any]

    @property
    def digest(self) -> str:
        """Stable hash of the architecture, stored in gradient files to catch mix-ups."""
        canonical = json.dumps(_architecture_fields(self.raw), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token for ONE copy in fp32 (scale by dtype size / 4)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4


def _architecture_fields(raw: dict[str, Any]) -> dict[str, Any]:
    ignored = {"torch_dtype", "dtype", "transformers_version", "_name_or_path", "use_cache"}
    return {k: v for k, v in raw.items() if k not in ignored}


def _require(raw: dict[str, Any], key: str, path: str) -> Any:
    if key not in raw:
        raise ProxyConfigError(f"{path}: missing field {key!r}")
    return raw[key]


def parse_config(raw: dict[str, Any], path: str = "config.json") -> ProxyConfig:
    """Validate a config dict and derive the shapes the engine needs."""
    family = raw.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ProxyConfigError(f"{path}: model_type {family!r} is not supported; expected one of {SUPPORTED_FAMILIES}")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ProxyConfigError(f"{path}: hidden_act {act!r} is not supported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag) and family != "qwen2":
            raise ProxyConfigError(f"{path}: {flag}=true is not supported for {family}")
    hidden = int(_require(raw, "hidden_size", path))
    heads = int(_require(raw, "num_attention_heads", path))
    head_dim = raw.get("head_dim") or hidden // heads
    sliding = None
    if family == "mistral" and raw.get("sliding_window"):
        sliding = int(raw["sliding_window"])
    if family in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        raise ProxyConfigError(f"{path}: use_sliding_window=true is not supported for {family}")
    return ProxyConfig(
        family=family,
        vocab_size=int(_require(raw, "vocab_size", path)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", path)),
        num_layers=int(_require(raw, "num_hidden_layers", path)),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        sliding_window=sliding,
        qk_norm=family == "qwen3",
        raw=raw,
    )


def load_config(model_dir: str | Path) -> ProxyConfig:
    """Read ``model_dir/config.json``; errors name the file and the offending field."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ProxyConfigError(f"{path}: not found (a proxy directory needs config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ProxyConfigError(f"{path}: invalid JSON ({exc})") from exc
    return parse_config(raw, str(path))
