"""vLLM V2-model-runner logits processor (vLLM's default runner on CUDA). EXPERIMENTAL until
``benchmarks/gpu_v2_check.py`` has passed on a GPU: the V2 runner needs Triton's GPU backend, so here
it is unit-tested against vLLM's real V2 interface objects only.

    --logits-processors antidistill.proxy_worker.runtime.vllm_v2:AntidistillationLogitsProcessorV2

The V2 runner keys requests by persistent *slot*, reorders logits rows every step, keeps token
history on the device and has no removal callback: a finished or preempted request just stops
appearing, and its slot is later given to a new request through ``add_request``. So:

- ``add_request`` resets everything the slot held (arguments, host history, proxy KV);
- ``apply`` maps each slot of the step to its logits row, the batch position (one row per request:
  speculative decoding, which gives a request one row per draft token, is refused at start-up);
- a slot absent from a step keeps its proxy KV and history, so a request the scheduler skipped
  resumes without a re-prefill; they are released when the slot is re-added, or earlier if its
  profile's KV pool needs the room for the rows of a step (longest-absent first);
- each protected slot's host history is brought up to date from the step's input tokens, read in
  one device→host copy per step (the host sync that remains: the proxy engine builds its plan and
  prefix digests from host token ids); the device history is read only for a slot that is new or
  came back longer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from antidistill.proxy_worker.runtime.logs import use_vllm_logging
from antidistill.proxy_worker.runtime.protection import withhold
from antidistill.proxy_worker.runtime.settings import RequestArgs, parse_request_args
from antidistill.proxy_worker.runtime.vllm_v1 import admission_settings, build_protection
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor

if TYPE_CHECKING:
    import torch
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState

log = logging.getLogger(__name__)

SPEC_DECODE_REFUSED = (
    "the antidistillation processor does not support speculative decoding yet (draft tokens would be "
    "verified against logits without λ·Δ): drop --speculative-config"
)


class AntidistillationLogitsProcessorV2(LogitsProcessor):
    """Adds λ·Δ to the raw logits of slots whose request set ``vllm_xargs.ad_lambda`` > 0."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_request_args(sampling_params.extra_args, admission_settings())

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState) -> None:
        use_vllm_logging("antidistill.proxy_worker")
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError(SPEC_DECODE_REFUSED)
        self.req_states = req_states
        self.protection = build_protection(vllm_config, req_states.device)
        self.settings = self.protection.settings
        self.args: dict[int, RequestArgs] = {}
        self.history: dict[int, list[int]] = {}
        self.last_seen: dict[int, int] = {}  # slot → the last step it was in (eviction order)
        self.steps = 0

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """A (new or resumed) request takes ``req_idx``: the slot's previous occupant is forgotten."""
        self._release(req_idx)
        self.args.pop(req_idx, None)
        try:
            args = parse_request_args(sampling_params.extra_args, self.settings)
        except ValueError as exc:  # admission validated them: only a settings drift gets here
            self.protection.add_unreadable(req_idx, sampling_params.extra_args, str(exc))
            return True
        if not args.protected:
            return False
        self.args[req_idx] = args
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.args and not self.protection.rows:
            return logits
        self.steps += 1
        slots = ctx.idx_mapping_np.tolist()
        if logits.shape[0] != len(slots):
            return self._withhold_expanded(logits, ctx)
        present = [slot for slot in slots if slot in self.args]
        if present:
            newest = ctx.input_ids.tolist()  # the one device→host copy of the step
            for row, slot in enumerate(slots):
                if slot in self.args:
                    self._sync(slot, int(ctx.seq_lens_upper_bound_np[row]), int(newest[row]))
                    self.last_seen[slot] = self.steps
            self._make_room(present)
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

    def _make_room(self, present: list[int]) -> None:
        """Release absent slots (longest-absent first) while a profile's pool has fewer free blocks
        than this step's rows may take; an upper bound, since prefix sharing only ever needs fewer.
        Withheld rows are never released: a released slot that came back would be served again."""
        here = set(present)
        absent = sorted(
            (s for s in self.history if s not in here and self._releasable(s)), key=lambda s: self.last_seen.get(s, 0)
        )
        if not absent:
            return
        for profile, engine in self.protection.engines.items():
            lengths = {slot: len(self.history[slot]) for slot in present if self.args[slot].profile == profile}
            for slot in absent:
                if not engine.blocks_short(lengths):
                    break
                if self.args[slot].profile == profile:
                    self._release(slot)

    def _releasable(self, slot: int) -> bool:
        row = self.protection.rows.get(slot)
        return row is None or row.refused is None

    def _release(self, slot: int) -> None:
        """Forget the slot's proxy state (its arguments stay: the request may still be running)."""
        self.protection.remove(slot)
        self.history.pop(slot, None)
        self.last_seen.pop(slot, None)

    def _withhold_expanded(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        """More logits rows than requests (drafts; refused at start-up, so not expected): rows of
        protected slots cannot be mapped to a context, so they are withheld, never served raw."""
        owners = ctx.expanded_idx_mapping.tolist()
        rows = [r for r, slot in enumerate(owners) if slot in self.args or slot in self.protection.rows]
        if rows:
            log.error(
                "antidistillation: %d logits rows for %d requests; protected rows withheld",
                len(owners),
                len(ctx.idx_mapping_np),
            )
            withhold(logits, rows)
        return logits
