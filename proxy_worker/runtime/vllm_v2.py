"""vLLM V2-model-runner logits processor (CUDA default when Triton is present). EXPERIMENTAL:
vLLM's V2 runner cannot run on CPU, so this path is unit-tested against its interface objects
only, and has an end-to-end GPU script (``benchmarks/gpu_v2_check.py``) that has not yet been run.

    VLLM_USE_V2_MODEL_RUNNER=1 \
        --logits-processors antidistill.proxy_worker.runtime.vllm_v2:AntidistillationLogitsProcessorV2

The V2 runner keys requests by persistent *slot*, reorders logits rows every step, keeps token
history on the device and gives no removal callback. So: arguments are recorded per slot in
``add_request``; at each ``apply`` the slots in the step are mapped to their rows, slots that left
the step release their proxy KV, and each protected slot's host-side history is brought up to
date from the step's input tokens (one small device→host copy), re-reading the device history
only when a slot is new or was away.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from antidistill.proxy_worker.runtime.settings import RequestArgs, parse_request_args
from antidistill.proxy_worker.runtime.vllm_v1 import admission_settings, build_protection, use_vllm_logging
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

if TYPE_CHECKING:
    import torch
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

log = logging.getLogger(__name__)


class AntidistillationLogitsProcessorV2(LogitsProcessor):
    """Adds λ·Δ to the raw logits of slots whose request set ``vllm_xargs.ad_lambda`` > 0."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_request_args(sampling_params.extra_args, admission_settings())

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        use_vllm_logging()
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError(
                "the antidistillation V2 processor does not support speculative decoding yet (draft tokens "
                "would be checked against the raw teacher): drop --speculative-config"
            )
        self.req_states = req_states
        self.protection = build_protection(vllm_config, req_states.device)
        self.settings = self.protection.settings
        self.args: dict[int, RequestArgs] = {}
        self.history: dict[int, list[int]] = {}

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """A (new or resumed) request takes ``req_idx``: forget the slot's previous occupant."""
        self.protection.remove(req_idx)
        self.history.pop(req_idx, None)
        try:
            args = parse_request_args(sampling_params.extra_args, self.settings)
        except ValueError as exc:  # admission validated them: only a settings drift gets here
            self.args.pop(req_idx, None)
            self.protection.add_unreadable(req_idx, sampling_params.extra_args, str(exc))
            return True
        if not args.protected:
            self.args.pop(req_idx, None)
            return False
        self.args[req_idx] = args
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.args and not self.protection.rows:
            return logits
        slots = [int(s) for s in ctx.idx_mapping_np]
        present = {slot: row for row, slot in enumerate(slots) if slot in self.args}
        for slot in [s for s in self.history if s not in present]:
            self.protection.remove(slot)
            del self.history[slot]
        if present:
            rows = list(present.values())
            newest = ctx.input_ids[rows].tolist()
            for (slot, row), token in zip(present.items(), newest, strict=True):
                self._sync(slot, int(ctx.seq_lens_upper_bound_np[row]), int(token))
        in_step = {slot: row for row, slot in enumerate(slots) if slot in self.protection.rows}
        return self.protection.apply(logits, in_step) if in_step else logits

    def _sync(self, slot: int, length: int, newest: int) -> None:
        """Make the slot's host history exactly its ``length``-token prefix ending in ``newest``."""
        history = self.history.get(slot)
        if history is None:
            history = self.history[slot] = []
            self.protection.add(slot, self.args[slot], history, ())
        del history[length - 1 :]
        if len(history) < length - 1:
            device_ids = self.req_states.all_token_ids.gpu[slot, len(history) : length - 1]
            history.extend(int(t) for t in device_ids.tolist())
        history.append(newest)
