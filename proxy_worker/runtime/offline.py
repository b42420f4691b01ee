"""The processor in vLLM's offline engine (``vllm.LLM``): how the evaluation and ``antidistill tune``
sample, through the SAME logits processor the server runs.

One engine is started with the processor and the operator's settings; every strength is a set of
ordinary requests whose per-request arguments (``ad_lambda``, ``ad_mode`` in
``SamplingParams.extra_args``, what ``vllm_xargs`` becomes over HTTP) and temperature differ, so a
whole sweep shares one engine start. Every protected request carries a ticket into a fresh failure
ledger, and a request whose Δ was withheld fails the call (``ProtectionFailed``): a sweep never
reports unprotected text as protected.

The same engine scores text: ``token_logprobs`` is the unprotected teacher's log-probability of each
emitted token (vLLM's prompt logprobs, which no logits processor touches), what trace quality is
measured with.
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
from antidistill.proxy_worker.runtime.settings import CONFIG_KEY, ENV_VAR, PROCESSOR_PATH, RequestArgs

log = logging.getLogger("antidistill.offline")


@dataclass(frozen=True)
class TraceRequest:
    prompt_ids: list[int]
    temperature: float
    lam: float = 0.0
    mode: str = "ad"
    seed: int | None = None  # its own sampling seed: the same trace whatever the batch it lands in
    profile: str | None = None  # None: the settings' default profile

    def extra_args(self, ticket: int) -> dict[str, Any]:
        """What ``vllm_xargs`` would carry; a protected request also gets its failure-ledger ticket."""
        if self.lam <= 0:
            return {}
        return RequestArgs(self.lam, self.profile or "", self.mode, ticket).to_xargs()


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finished: bool  # stopped by EOS or a stop string, not cut at max_tokens


class ProtectionFailed(RuntimeError):
    """Some completions were sampled without their Δ (a row the processor withheld): they are not
    what the request claims to be, so the call fails rather than return them."""


class OfflineEngine:
    """A started ``vllm.LLM`` with the processor, and the failure ledger its worker writes to."""

    def __init__(self, llm: Any, ledger: failure_ledger.FailureLedger) -> None:
        self.llm = llm
        self.ledger = ledger
        self._tickets = 0

    def generate(
        self, requests: Sequence[TraceRequest], *, top_p: float, max_tokens: int, chunk: int = 2048
    ) -> list[Completion]:
        """Completions for ``requests``, in order, submitted ``chunk`` at a time (progress is logged
        between chunks). Raises ``ProtectionFailed`` if any protected request lost its Δ."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out: list[Completion] = []
        start = time.time()
        for i in range(0, len(requests), chunk):
            part = requests[i : i + chunk]
            params = []
            for r in part:
                self._tickets += 1
                params.append(
                    SamplingParams(
                        temperature=r.temperature,
                        top_p=top_p,
                        max_tokens=max_tokens,
                        seed=r.seed,
                        extra_args=r.extra_args(ticket=self._tickets),
                    )
                )
            prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in part]
            for result in self.llm.generate(prompts, params, use_tqdm=False):
                o = result.outputs[0]
                out.append(Completion(o.text, list(o.token_ids), o.finish_reason == "stop"))
            log.info("sampled %d/%d requests (%.0f s)", len(out), len(requests), time.time() - start)
        check_protected(self.ledger.read())
        return out

    def token_logprobs(
        self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """The unprotected teacher's log-probability of each completion token after its prompt (vLLM's
        prompt logprobs of prompt + completion: computed before any logits processor, at τ = 1)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        inputs = [TokensPrompt(prompt_token_ids=[*p, *c]) for p, c in zip(prompts, completions, strict=True)]
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        scored = []
        for result, prompt, completion in zip(
            self.llm.generate(inputs, params, use_tqdm=False), prompts, completions, strict=True
        ):
            per_position = result.prompt_logprobs[len(prompt) :]
            scored.append([step[token].logprob for step, token in zip(per_position, completion, strict=True)])
        return scored


def check_protected(batch: failure_ledger.Batch) -> None:
    """Raise ``ProtectionFailed`` if the ledger holds any failure (or overflowed)."""
    if batch.records or batch.overflowed:
        reasons = Counter(r.reason.label for r in batch.records)
        detail = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "ledger overflowed"
        raise ProtectionFailed(
            f"{len({r.ticket for r in batch.records})} protected trace requests lost their Δ ({detail}): "
            "their traces are not protected; fix the cause (see the engine log) and rerun"
        )


@contextmanager
def offline_engine(
    teacher: str | Path,
    settings: dict[str, Any],
    *,
    seed: int,
    engine_args: dict[str, Any],
    processor: str = PROCESSOR_PATH,
) -> Iterator[OfflineEngine]:
    """A started engine with the processor and ``settings`` (the ``antidistillation`` object, as
    ``antidistill serve`` passes it); shut down afterwards. ``engine_args`` go to ``vllm.LLM``, except
    ``kv_cache_gib`` (the CPU KV space, default 1)."""
    from vllm import LLM

    engine_args = dict(engine_args)
    with (
        tempfile.TemporaryDirectory(prefix="antidistill-offline-") as scratch,
        processor_environment(
            settings, engine_args.pop("kv_cache_gib", 1), failure_ledger.create(Path(scratch) / "failures")
        ) as ledger,
    ):
        llm = LLM(
            model=str(teacher),
            seed=seed,
            logits_processors=[processor],
            additional_config={CONFIG_KEY: settings},
            **engine_args,
        )
        try:
            yield OfflineEngine(llm, ledger)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


@contextmanager
def processor_environment(settings: dict, kv_cache_gib: int, ledger: Path) -> Iterator[failure_ledger.FailureLedger]:
    """The environment the engine needs, restored afterwards: ``validate_params`` runs in this
    (front-end) process, reads the settings from ``ANTIDISTILL_CONFIG`` and caches them, so a
    later engine in the same process (a test session) must not inherit ours. Yields the reader
    of the failure ledger the engine writes to."""
    from antidistill.proxy_worker.runtime.vllm_v1 import admission_settings

    wanted = {
        ENV_VAR: json.dumps({CONFIG_KEY: settings}),
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
