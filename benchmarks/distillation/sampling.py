"""Teacher traces through the SAME vLLM logits processor the server runs.

One offline vLLM engine (``vllm.LLM``) is started with ``AntidistillationLogitsProcessor`` and the
run's proxy and gradient; every grid point is a set of ordinary requests whose per-request
arguments (``ad_lambda``, ``ad_mode`` in ``SamplingParams.extra_args``, what ``vllm_xargs`` becomes
over HTTP) and temperature differ, so all points share one engine start.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antidistill.proxy_worker.runtime.settings import ENV_VAR, PROCESSOR_PATH

log = logging.getLogger("antidistill.eval")
PROFILE = "eval"


@dataclass(frozen=True)
class TraceRequest:
    prompt_ids: list[int]
    temperature: float
    lam: float = 0.0
    mode: str = "ad"
    seed: int | None = None  # its own sampling seed: the same trace whatever the batch it lands in

    def extra_args(self) -> dict[str, Any]:
        return {"ad_lambda": self.lam, "ad_mode": self.mode} if self.lam > 0 else {}


def processor_settings(proxy: Path, gradient: Path, epsilon: float, max_lambda: float, budget: int) -> dict:
    """The ``antidistillation`` settings object, exactly as ``antidistill serve`` would pass it."""
    return {
        "proxy": str(proxy),
        "profiles": {PROFILE: {"gradient": str(gradient), "epsilon": epsilon}},
        "allowed_modes": ["ad", "permutation"],
        "max_lambda": max_lambda,
        "token_budget": budget,
    }


def generate(
    teacher: Path,
    settings: dict,
    requests: Sequence[TraceRequest],
    *,
    top_p: float,
    max_tokens: int,
    seed: int,
    engine_args: dict[str, Any],
    chunk: int = 2048,
) -> list[str]:
    """Completions (text) for ``requests``, in order, submitted ``chunk`` at a time (progress is
    logged between chunks); the engine is shut down afterwards."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with processor_environment(settings, engine_args.pop("kv_cache_gib", 1)):
        llm = LLM(
            model=str(teacher),
            seed=seed,
            logits_processors=[PROCESSOR_PATH],
            additional_config={"antidistillation": settings},
            **engine_args,
        )
        try:
            texts: list[str] = []
            start = time.time()
            for i in range(0, len(requests), chunk):
                part = requests[i : i + chunk]
                params = [
                    SamplingParams(
                        temperature=r.temperature,
                        top_p=top_p,
                        max_tokens=max_tokens,
                        seed=r.seed,
                        extra_args=r.extra_args(),
                    )
                    for r in part
                ]
                prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in part]
                texts.extend(o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False))
                log.info("traces: %d/%d requests (%.0f s)", len(texts), len(requests), time.time() - start)
            return texts
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


@contextmanager
def processor_environment(settings: dict, kv_cache_gib: int) -> Iterator[None]:
    """The environment the engine needs, restored afterwards: ``validate_params`` runs in this
    (front-end) process, reads the settings from ``ANTIDISTILL_CONFIG`` and caches them, so a
    later engine in the same process (a test session) must not inherit ours."""
    from antidistill.proxy_worker.runtime.vllm_v1 import admission_settings

    wanted = {ENV_VAR: json.dumps({"antidistillation": settings}), "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    admission_settings.cache_clear()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        admission_settings.cache_clear()
