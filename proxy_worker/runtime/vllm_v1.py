"""vLLM V1-model-runner logits processor (the CPU build; CUDA with ``VLLM_USE_V2_MODEL_RUNNER=0``).

    --logits-processors antidistill.proxy_worker.runtime.vllm_v1:AntidistillationLogitsProcessor

A thin adapter: it translates BatchUpdate events into ``Protection`` calls. Token values are read
in ``apply`` (through the live output lists), never in ``update_state``, so async scheduling's
placeholder tokens are never seen.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import TYPE_CHECKING

import torch
from antidistill.proxy_worker.runtime import capacity
from antidistill.proxy_worker.runtime.failure_ledger import ENV_VAR as FAILURE_LEDGER_ENV
from antidistill.proxy_worker.runtime.failure_ledger import FailureLedger
from antidistill.proxy_worker.runtime.logs import use_vllm_logging
from antidistill.proxy_worker.runtime.protection import Protection
from antidistill.proxy_worker.runtime.settings import ProcessorSettings, load_settings, parse_request_args
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger(__name__)


def build_protection(vllm_config: VllmConfig, device: torch.device | str) -> Protection:
    """The worker's Protection, its KV pool sized to follow the teacher's capped KV capacity."""
    settings = load_settings(vllm_config.additional_config)
    plan = capacity.from_vllm_config(vllm_config, settings.token_budget)
    if plan.coupled:
        log.info(
            "antidistillation: proxy KV pool %d tokens per profile follows the teacher's %d tokens (+%d headroom)",
            plan.proxy_tokens,
            plan.teacher_tokens,
            plan.headroom,
        )
    else:
        log.warning(
            "antidistillation: the teacher's KV capacity is not capped (no --num-gpu-blocks-override), so "
            "the proxy's %d-token pool may not hold everything vLLM schedules; protected rows that do not "
            "fit are refused (antidistill serve sets the cap)",
            plan.proxy_tokens,
        )
    ledger = FailureLedger.from_env()
    if ledger is None:
        log.warning(
            "antidistillation: no failure ledger (%s): a protected row without Δ is withheld (uniform "
            "logits) but no gateway is told to refuse it; antidistill serve sets one up",
            FAILURE_LEDGER_ENV,
        )
    model = vllm_config.model_config
    return Protection.from_settings(
        settings,
        device,
        teacher_tokenizer=model.tokenizer,
        teacher_width=model.get_vocab_size(),
        token_budget=plan.proxy_tokens,
        ledger=ledger,
    )


@cache
def admission_settings() -> ProcessorSettings:
    """Settings in the API-server process (no engine config there: see antidistill.proxy_worker.runtime.settings)."""
    from vllm.config import get_current_vllm_config_or_none

    current = get_current_vllm_config_or_none()
    return load_settings(current.additional_config if current is not None else None)


class AntidistillationLogitsProcessor(LogitsProcessor):
    """Adds λ·Δ to the raw logits of rows whose request set ``vllm_xargs.ad_lambda`` > 0."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_request_args(sampling_params.extra_args, admission_settings())

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        use_vllm_logging("antidistill.proxy_worker")
        self.protection = build_protection(vllm_config, device)

    def is_argmax_invariant(self) -> bool:
        return False

    def _add(self, index: int, params: SamplingParams, prompt: list[int], output: list[int]) -> None:
        try:
            args = parse_request_args(params.extra_args, self.protection.settings)
        except ValueError as exc:  # admission validated them: only a settings drift gets here
            self.protection.add_unreadable(index, params.extra_args, str(exc))
            return
        self.protection.add(index, args, prompt, output)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.protection.remove(index)
        for index, params, prompt, output in batch_update.added:
            self._add(index, params, prompt or [], output)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.protection.swap(a, b)
            else:
                self.protection.move(a, b)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.protection.apply(logits)
