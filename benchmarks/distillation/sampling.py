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
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antidistill.proxy_worker.runtime import failure_ledger
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

    def extra_args(self, ticket: int) -> dict[str, Any]:
        """What ``vllm_xargs`` would carry; a protected request also gets its failure-ledger ticket."""
        return {"ad_lambda": self.lam, "ad_mode": self.mode, "ad_ticket": ticket} if self.lam > 0 else {}


class ProtectionFailed(RuntimeError):
    """Some traces were sampled without their Δ (a row the processor withheld): they are not what the
    grid point claims to be, so the stage fails rather than distil from them."""


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
    processor: str = PROCESSOR_PATH,
) -> list[str]:
    """Completions (text) for ``requests``, in order, submitted ``chunk`` at a time (progress is
    logged between chunks); the engine is shut down afterwards. Every protected request carries a
    ticket (its index + 1) that the processor writes to a fresh failure ledger if its Δ fails; any
    record there raises ``ProtectionFailed`` (0 fallbacks, 0 unprotected tokens, or no traces)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with (
        tempfile.TemporaryDirectory(prefix="antidistill-eval-") as scratch,
        processor_environment(
            settings, engine_args.pop("kv_cache_gib", 1), failure_ledger.create(Path(scratch) / "failures")
        ) as ledger,
    ):
        llm = LLM(
            model=str(teacher),
            seed=seed,
            logits_processors=[processor],
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
                        extra_args=r.extra_args(ticket=i + j + 1),
                    )
                    for j, r in enumerate(part)
                ]
                prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in part]
                texts.extend(o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False))
                log.info("traces: %d/%d requests (%.0f s)", len(texts), len(requests), time.time() - start)
            check_protected(ledger.read())
            return texts
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


def check_protected(batch: failure_ledger.Batch) -> None:
    """Raise ``ProtectionFailed`` if the ledger holds any failure (or overflowed)."""
    if batch.records or batch.overflowed:
        reasons = Counter(r.reason.label for r in batch.records)
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "ledger overflowed"
        raise ProtectionFailed(
            f"{len({r.ticket for r in batch.records})} protected trace requests lost their Δ ({detail}): "
            "their traces are not protected; fix the cause (see the engine log) and rerun the stage"
        )


@contextmanager
def processor_environment(settings: dict, kv_cache_gib: int, ledger: Path) -> Iterator[failure_ledger.FailureLedger]:
    """The environment the engine needs, restored afterwards: ``validate_params`` runs in this
    (front-end) process, reads the settings from ``ANTIDISTILL_CONFIG`` and caches them, so a
    later engine in the same process (a test session) must not inherit ours. Yields the reader
    of the failure ledger the engine writes to."""
    from antidistill.proxy_worker.runtime.vllm_v1 import admission_settings

    wanted = {
        ENV_VAR: json.dumps({"antidistillation": settings}),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        failure_ledger.ENV_VAR: str(ledger),
    }
    saved = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    admission_settings.cache_clear()
    reader = failure_ledger.FailureLedger(ledger)
    try:
        yield reader
    finally:
        reader.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        admission_settings.cache_clear()
