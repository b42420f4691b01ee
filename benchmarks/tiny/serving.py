"""Tiny teacher + proxy + gradients for the vLLM integration tests (real engine, CPU build)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from antidistill.benchmarks.tiny.models import CORPUS, save_tiny, train_tokenizer
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.weights import load_proxy_state
from antidistill.proxy_worker.runtime.settings import PROCESSOR_PATH as PROCESSOR
from antidistill.proxy_worker.tools.gradient import build_gradient_file

EPSILONS = {"math": 1e-3, "code": 1e-2}


@dataclass(frozen=True)
class ADModels:
    teacher: Path
    proxy: Path
    gradients: dict[str, Path]
    tokenizer: object

    def settings(self, **overrides: object) -> dict:
        profiles = {name: {"gradient": str(path), "epsilon": EPSILONS[name]} for name, path in self.gradients.items()}
        base = {
            "proxy": str(self.proxy),
            "profiles": profiles,
            "default_profile": "math",
            "max_lambda": 20.0,
            "allowed_modes": ["ad", "permutation"],
            "token_budget": 4096,
        }
        return {**base, **overrides}

    def theta_and_grad(self, profile: str) -> tuple[dict, dict]:
        from antidistill.proxy_worker.core.gradient_file import load_gradient

        cfg = load_config(self.proxy)
        return load_proxy_state(self.proxy, cfg), load_gradient(self.gradients[profile], cfg)


def build_models(root: Path) -> ADModels:
    """Teacher (head_dim 64: the CPU attention backend rejects 16) and a smaller proxy sharing its
    tokenizer; two gradient profiles computed by the real gradient tool on different traces."""
    tok = train_tokenizer()
    teacher = save_tiny(
        root / "teacher",
        "llama",
        vocab_size=len(tok),
        hidden=128,
        heads=2,
        kv_heads=1,
        head_dim=64,
        intermediate=256,
        layers=2,
        seed=11,
        tokenizer=tok,
    )
    proxy = save_tiny(
        root / "proxy",
        "llama",
        vocab_size=len(tok),
        hidden=64,
        heads=2,
        kv_heads=1,
        head_dim=32,
        intermediate=128,
        layers=2,
        seed=12,
        tokenizer=tok,
    )
    grads = {}
    for i, name in enumerate(("math", "code")):
        records = [{"prompt": s[:20], "completion": s[20:]} for s in CORPUS[i::4][:8]]
        grads[name] = build_gradient_file(proxy, records, root / f"{name}.safetensors", tokenizer=tok).path
    return ADModels(teacher, proxy, grads, tok)


def engine_env(models: ADModels) -> None:
    """Small CPU engine settings, and the processor settings for the API-side admission check
    (both must be set before vLLM starts)."""
    os.environ["ANTIDISTILL_CONFIG"] = additional_config_json(models)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    torch.set_num_threads(2)


def llm_kwargs(models: ADModels, processor: bool, **extra: object) -> dict:
    kw = dict(
        model=str(models.teacher),
        dtype="float32",
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=16,
        seed=0,
        disable_log_stats=False,
        **extra,
    )
    if processor:
        kw["logits_processors"] = [PROCESSOR]
        kw["additional_config"] = {"antidistillation": models.settings()}
    return kw


def server_flags(models: ADModels, port: int) -> list[str]:
    """vLLM server flags for the tiny teacher on a loopback port (our server passes them through)."""
    return [
        "--model",
        str(models.teacher),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "256",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def antidistill_serve_args(
    models: ADModels, tiers: Path, audit: Path, port: int, profiles: tuple[str, ...] = ("math",)
) -> list[str]:
    """`python -m antidistill.server serve ...` for the tiny models (our server, as operators start it)."""
    gradients = [arg for name in profiles for arg in ("--gradient", f"{name}={models.gradients[name]}")]
    return [
        "-m",
        "antidistill.server",
        "serve",
        "--proxy",
        str(models.proxy),
        *gradients,
        "--tiers",
        str(tiers),
        "--audit-log",
        str(audit),
        *server_flags(models, port),
    ]


def write_tiers(path: Path, tiers: dict) -> dict[str, str]:
    """A tiers file with one fresh key per tier; returns tier → key (what clients send)."""
    from antidistill.server.tiers import new_key

    keys, entries = {}, []
    for tier in tiers:
        keys[tier], digest = new_key()
        entries.append({"sha256": digest, "tier": tier})
    path.write_text(yaml.safe_dump({"tiers": tiers, "keys": entries}))
    return keys


def additional_config_json(models: ADModels) -> str:
    return json.dumps({"antidistillation": models.settings()})
