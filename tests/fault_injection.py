"""Our logits processor with faults injected at the engine boundary, for the fail-closed tests.

``antidistill serve --logits-processors tests.fault_injection:FaultyProcessor`` uses it instead
of ours (a subclass replaces the built-in one). ``ANTIDISTILL_TEST_FAULTS`` (JSON) says what to break:

- ``pool_tokens``: every profile's proxy KV pool is rebuilt this small, below what the teacher
  can schedule — the capacity bug the coupling prevents, so that the budget path is exercised;
- ``nan_token`` / ``raise_token``: a row whose prompt starts with this token id reports a
  non-finite Δ at every step / makes the whole proxy step raise (as an out-of-memory would).
Everything else is the production code path: Protection, the ledger, the gateway.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import torch
from antidistill.proxy_worker.runtime.engine import ProxyEngine, StepResult
from antidistill.proxy_worker.runtime.failure_ledger import Reason, RowFailure
from antidistill.proxy_worker.runtime.vllm_v1 import AntidistillationLogitsProcessor

ENV_VAR = "ANTIDISTILL_TEST_FAULTS"


def _first_token(engine: ProxyEngine, index: int) -> int | None:
    row = engine.cache.rows.get(index)
    return row.prompt[0] if row is not None and len(row.prompt) else None


def _faulty_step(engine: ProxyEngine, nan_token: int | None, raise_token: int | None) -> Callable:
    real = engine.step

    def step(indices: Sequence[int]) -> StepResult:
        firsts = [_first_token(engine, i) for i in indices]
        if raise_token is not None and raise_token in firsts:
            raise torch.OutOfMemoryError("injected: out of memory in a mixed prefill/decode pass")
        result = real(indices)
        for pos, (index, first) in enumerate(zip(indices, firsts, strict=True)):
            if nan_token is not None and first == nan_token:
                result.delta[pos] = 0.0
                result.failed[index] = RowFailure(Reason.NON_FINITE, "non-finite delta (injected)")
        return result

    return step


class FaultyProcessor(AntidistillationLogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        faults = json.loads(os.environ.get(ENV_VAR, "{}"))
        engines = self.protection.engines
        for name, engine in list(engines.items()):
            if faults.get("pool_tokens"):
                engine = engines[name] = ProxyEngine(engine.model, engine.epsilon, faults["pool_tokens"])
            engine.step = _faulty_step(engine, faults.get("nan_token"), faults.get("raise_token"))
