"""One proxy step: the newest tokens of the protected rows → their Δ rows.

The engine owns the two-copy proxy (θ+εg, θ−εg; under a restricted Δ mode the layers g leaves alone
are held and run once) and its KV cache. Callers (the vLLM adapters)
tell it about rows coming and going and ask for Δ of the rows that need it; rows that are not
asked about cost nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from antidistill.proxy_worker.core.config import ProxyConfig, load_config
from antidistill.proxy_worker.core.delta import finite_difference, zero_non_finite_
from antidistill.proxy_worker.core.delta_mode import DeltaMode
from antidistill.proxy_worker.core.gradient_file import load_gradient
from antidistill.proxy_worker.core.model import StackedProxy
from antidistill.proxy_worker.core.plan import AttentionPath, build_plan
from antidistill.proxy_worker.core.weights import load_proxy_state, parse_dtype, stack_perturbed
from antidistill.proxy_worker.runtime.cache import ProxyBudgetExceeded, ProxyKVCache, RowState
from antidistill.proxy_worker.runtime.failure_ledger import Reason, RowFailure


def unknown_token(tokens: Sequence[int], vocab_size: int) -> int | None:
    """The first token id the proxy has no embedding for, if any."""
    return next((t for t in tokens if not 0 <= t < vocab_size), None) if tokens else None


@dataclass
class StepResult:
    """Δ rows in the order asked for (fp32, zero where a row failed) and what the step did."""

    delta: torch.Tensor
    failed: dict[int, RowFailure] = field(default_factory=dict)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    # position → the Δ (0-d, on the device) of the token the row sampled since its last step: the
    # previous step's Δ at the one token that was appended, i.e. the Δ that token was served with
    sampled: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class KVUsage:
    used_tokens: int
    capacity_tokens: int
    nbytes: int


class ProxyEngine:
    """Finite-difference Δ for batched rows over a shared, bounded proxy KV cache."""

    def __init__(
        self,
        model: StackedProxy,
        epsilon: float,
        token_budget: int,
        block_size: int = 16,
        max_pass_tokens: int = 512,
        attention: AttentionPath = "reference",
    ) -> None:
        """``attention``: "reference" gathers each row's prefix per layer; "flex" reads the paged
        KV in place (compiled FlexAttention, the same Δ within rounding); "auto" reads it in place
        for big decode groups only (``plan.FLEX_MIN_KEYS``)."""
        if model.copies != 2:
            raise ValueError("the engine needs exactly two output copies: θ+εg and θ−εg")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.model = model
        self.epsilon = epsilon
        self.max_pass_tokens = max_pass_tokens
        self.attention = attention
        self.cache = ProxyKVCache(model.cfg, model.layer_copies, model.dtype, token_budget, block_size, model.device)
        self._interrupted = False

    @classmethod
    def from_files(
        cls,
        proxy_dir: str | Path,
        gradient_path: str | Path,
        epsilon: float,
        dtype: str = "float32",
        token_budget: int = 16384,
        device: torch.device | str = "cpu",
        attention: AttentionPath = "reference",
        mode: DeltaMode | None = None,
    ) -> ProxyEngine:
        """Load θ and g, validate them against each other (and g's Δ mode against ``mode``, if
        given), and build θ ± εg (fp32, then cast; a restricted mode's shared layers once)."""
        cfg = load_config(proxy_dir)
        theta = load_proxy_state(proxy_dir, cfg)
        grad = load_gradient(gradient_path, cfg, mode)
        params = stack_perturbed(theta, grad, (epsilon, -epsilon), cfg, parse_dtype(dtype), device)
        return cls(StackedProxy(cfg, params, device), epsilon, token_budget, attention=attention)

    @property
    def cfg(self) -> ProxyConfig:
        return self.model.cfg

    @property
    def kv(self) -> KVUsage:
        """The proxy KV pool's occupancy (metrics, start-up log)."""
        return KVUsage(self.cache.used_tokens, self.cache.capacity_tokens, self.cache.nbytes)

    def length(self, index: int) -> int:
        """Tokens row ``index`` holds (prompt and output so far)."""
        return self.cache.rows[index].length

    def blocks_short(self, lengths: Mapping[int, int]) -> int:
        """KV blocks the rows would still need to hold ``lengths`` tokens each, beyond the free ones
        (an upper bound: prefix sharing only ever needs fewer); 0 when they fit."""
        need = 0
        for index, tokens in lengths.items():
            row = self.cache.rows.get(index)
            held = len(row.blocks) if row is not None else 0
            need += max(-(-tokens // self.cache.block_size) - held, 0)
        return max(need - self.cache.free_blocks, 0)

    def served_delta(self, index: int) -> torch.Tensor | None:
        """The Δ row ``index``'s newest token was sampled with: its last step's Δ at that token, 0-d
        on the device (None: not exactly one new token since that step, or that step had no Δ)."""
        row = self.cache.rows.get(index)
        if row is None or row.last_delta is None or row.length != row.computed + 1:
            return None
        token = row.tokens(row.computed, row.length)[0]
        return row.last_delta[token] if 0 <= token < self.cfg.vocab_size else None

    def add(self, index: int, prompt: Sequence[int], output: Sequence[int] = (), salt: str | None = None) -> None:
        """Track a row. ``output`` may be a live list that grows; it is read at step time. The row
        shares cached prefix blocks only with rows of the same ``salt`` (its tenant's)."""
        self.cache.add(index, prompt, output, salt)

    def remove(self, index: int) -> None:
        self.cache.remove(index)

    def move(self, src: int, dst: int) -> None:
        self.cache.move(src, dst)

    def swap(self, a: int, b: int) -> None:
        self.cache.swap(a, b)

    def rebuild(self, index: int) -> None:
        self.cache.rebuild(index)

    def step(self, indices: Sequence[int]) -> StepResult:
        """Δ for each row in ``indices`` given its current token history.

        A row whose history shrank is recomputed (from the longest shared prefix still resident);
        a row with nothing new reuses its last Δ (a chunked-prefill row asked again). A row that
        cannot get KV space is reported in ``failed`` (a ``RowFailure``: its ``Reason`` and a message)
        with Δ = 0 and stays failed until removed or rebuilt; so is a token outside the proxy's
        vocabulary, and a non-finite Δ (for that step only). Nothing here raises for a single row's
        sake; if a pass raises (e.g. out of memory), the next step first releases the rows that
        hold blocks the interrupted step did not finish writing.
        """
        result = StepResult(torch.zeros(len(indices), self.cfg.vocab_size, device=self.model.device))
        if self._interrupted:
            self.cache.drop_unwritten()
        self._interrupted = True
        work: list[tuple[int, RowState, int]] = []
        for pos, index in enumerate(indices):
            row = self.cache.rows.get(index)
            if row is None:
                result.failed[index] = RowFailure(Reason.ERROR, "row was never added")
                continue
            if row.length < row.computed:
                self.cache.rebuild(index)
            if row.error is not None:
                result.failed[index] = row.error
            elif row.length == 0:
                result.failed[index] = RowFailure(Reason.ERROR, "row has no tokens")
            elif row.length == row.computed and row.last_delta is not None:
                result.delta[pos] = row.last_delta
            elif row.length == row.computed:  # asked again after a non-finite Δ: still none to give
                result.failed[index] = RowFailure(Reason.NON_FINITE, "non-finite delta")
            elif (unknown := unknown_token(row.tokens(row.computed, row.length), self.cfg.vocab_size)) is not None:
                # the teacher's vocabulary may be wider (padded, or added tokens): an id the proxy's
                # embedding lacks would index out of range (on CUDA a device assert kills the engine)
                row.error = result.failed[index] = RowFailure(
                    Reason.VOCABULARY, f"token id {unknown} is outside the proxy's vocabulary of {self.cfg.vocab_size}"
                )
            else:
                if (served := self.served_delta(index)) is not None:
                    result.sampled[pos] = served
                try:
                    self.cache.reserve(row, row.length)
                except ProxyBudgetExceeded as exc:
                    self.cache.rebuild(index)
                    row.error = result.failed[index] = RowFailure(Reason.BUDGET, str(exc))
                    continue
                work.append((pos, row, row.length))
        self._run(work, indices, result)
        self._interrupted = False
        return result

    def _run(self, work: list[tuple[int, RowState, int]], indices: Sequence[int], result: StepResult) -> None:
        """Advance every row in ``work`` to its target length, ``max_pass_tokens`` per row per pass.

        A pass takes the rows whose shared blocks are written; a row that took blocks another row
        of this step is still writing waits for a later pass. Writers reserved before their
        readers, so each pass makes progress.
        """
        while work:
            ready = [item for item in work if self.cache.ready(item[1])]
            if not ready:
                raise RuntimeError("proxy KV: rows wait for shared blocks that no pass of this step writes")
            rows = [row for _, row, _ in ready]
            ends = [min(target, row.computed + self.max_pass_tokens) for _, row, target in ready]
            new = [row.tokens(row.computed, end) for row, end in zip(rows, ends, strict=True)]
            starts = [row.computed for row in rows]
            paged = self.cache.paged(rows)
            plan = build_plan(new, starts, paged, self.cfg.sliding_window, self.model.device, self.attention)
            delta, bad = zero_non_finite_(finite_difference(self.model.logits(plan, self.cache.store), self.epsilon))
            non_finite = bad.tolist()  # the pass's one device→host copy: the fail-closed signal, per row
            for j, ((pos, row, target), end) in enumerate(zip(ready, ends, strict=True)):
                count = end - row.computed
                if count == 1 and row.computed > 0:
                    result.decode_tokens += 1
                else:
                    result.prefill_tokens += count
                self.cache.mark_written(row, row.computed, end)
                row.computed = end
                if end < target:
                    continue
                result.delta[pos] = delta[j]
                row.last_delta = None if non_finite[j] else delta[j]
                if non_finite[j]:
                    result.failed[indices[pos]] = RowFailure(Reason.NON_FINITE, "non-finite delta")
            work = [item for item in work if item[1].computed < item[2]]
