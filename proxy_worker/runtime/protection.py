"""Protection of a teacher batch: which rows are protected, with which profile, λ and mode, and
the per-step ``logits[row] += λ · Δ_row``.

This is the one object the vLLM adapters talk to. It never raises from ``apply`` (an exception in
a logits processor kills the engine) and it never lets a protected row sample from the raw
teacher unless its request asked for that: a row whose Δ is unavailable for a step (KV budget,
non-finite Δ, an exception or out-of-memory in the step, a token the proxy lacks, arguments the
worker cannot read) is *withheld* — its logits are flattened to uniform over the tokens the
teacher's sampler still allows, for that step and every later one — and its ticket is written to
the failure ledger as refused, so the gateway refuses the request before any of that output
reaches a client. The one exception is a ``degrade`` row hit by a *transient* failure (non-finite
values, a failed step: ``Reason.transient``), which is served with Δ = 0 for that step, at most
``DEGRADE_STEPS`` times; its next failure refuses it. Sticky failures refuse a degrade row at
once: they would leave the rest of its output raw, which is what a trace harvester wants.

Ledger records are bounded per request, not per step: one per (ticket, reason), revised in place
with the number of steps served with Δ = 0 so far (the count the gateway reports as unprotected),
and one for the refusal (failure_ledger.py). Every failing step is still counted
(``antidistill_delta_fallbacks_total``); a row's first degraded step and its refusal are logged.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.delta import PermutationControl, add_scaled
from antidistill.proxy_worker.core.gradient_file import check_gradient_header, load_gradient, read_delta_scale
from antidistill.proxy_worker.core.model import StackedProxy
from antidistill.proxy_worker.core.weights import load_proxy_state, parse_dtype, stack_perturbed
from antidistill.proxy_worker.runtime import metrics
from antidistill.proxy_worker.runtime.engine import ProxyEngine
from antidistill.proxy_worker.runtime.failure_ledger import FailureLedger, Reason, RowFailure
from antidistill.proxy_worker.runtime.rows import RowMap
from antidistill.proxy_worker.runtime.settings import ProcessorSettings, RequestArgs, ticket_of
from antidistill.proxy_worker.runtime.vocabulary import check_proxy_matches_teacher

log = logging.getLogger(__name__)


def on_device(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small vector the host already knows, on ``device`` without making the host wait: a copy
    from pageable memory to a GPU is synchronous, one from pinned memory can be queued."""
    host = torch.tensor(list(values), dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def withhold(logits: torch.Tensor, targets: Sequence[int]) -> None:
    """Replace rows by a uniform distribution over the tokens still allowed (a grammar's or a
    processor's −inf stays): what the row samples then carries nothing of the teacher."""
    index = on_device(targets, torch.long, logits.device)
    rows = logits.index_select(0, index)
    logits.index_copy_(0, index, torch.where(rows == float("-inf"), rows, torch.zeros_like(rows)))


# Steps a degrade-mode row may be served with Δ = 0 before its next failure refuses it: enough to
# ride out a brief fault (a non-finite step, an out-of-memory retry) without a refusal, too few to
# harvest raw text by making the proxy fail.
DEGRADE_STEPS = 8


@dataclass
class _Row:
    args: RequestArgs
    key: str  # stable identity of the request's prompt, for the permutation control's signs
    refused: Reason | None = None  # set once the row lost Δ for good: withheld from then on
    degraded_steps: int = 0  # steps a degrade-mode row was served with Δ = 0
    records: dict[Reason, int] = field(default_factory=dict)  # reason → its ledger record's sequence number


def prompt_key(prompt: Sequence[int]) -> str:
    return hashlib.blake2b(repr(list(prompt)).encode(), digest_size=8).hexdigest()


class Protection:
    """Rows keyed by batch index, one ProxyEngine per gradient profile."""

    def __init__(
        self,
        settings: ProcessorSettings,
        engines: dict[str, ProxyEngine],
        control: PermutationControl | None,
        ledger: FailureLedger | None = None,
        scales: Mapping[str, float | None] | None = None,
    ) -> None:
        """``scales``: each profile's Δ scale, for the dose metric (a profile without one reports none)."""
        self.settings = settings
        self.engines = engines
        self.control = control
        self.ledger = ledger
        self.scales = dict(scales or {})
        self.doses = metrics.DoseBuffer()
        self.rows: RowMap[_Row] = RowMap(on_drop=self._release)
        self.clock = metrics.StepClock()
        for name, engine in engines.items():
            metrics.record_kv(name, engine.kv)

    @classmethod
    def from_settings(
        cls,
        settings: ProcessorSettings,
        device: torch.device | str = "cpu",
        teacher_tokenizer: str | None = None,
        teacher_width: int | None = None,
        token_budget: int | None = None,
        ledger: FailureLedger | None = None,
    ) -> Protection:
        """Load the proxy once and one θ ± εg pair per profile; check the proxy against the teacher.
        ``token_budget`` (default: the settings') is each profile's KV pool, in tokens."""
        cfg = load_config(settings.proxy)
        if settings.check_tokenizer and teacher_tokenizer is not None:
            check_proxy_matches_teacher(
                settings.proxy, teacher_tokenizer, cfg.vocab_size, teacher_width or cfg.vocab_size
            )
        theta = load_proxy_state(settings.proxy, cfg)
        dtype = parse_dtype(settings.proxy_dtype)
        engines = {}
        for name, spec in settings.profiles.items():
            eps = spec.epsilon or settings.epsilon
            mode = check_gradient_header(spec.gradient, cfg, spec.mode)
            grad = load_gradient(spec.gradient, cfg, mode)
            params = stack_perturbed(theta, grad, (eps, -eps), cfg, dtype, device)
            model = StackedProxy(cfg, params, device)
            engines[name] = engine = ProxyEngine(
                model, eps, token_budget or settings.token_budget, attention=settings.proxy_attention
            )
            log.info(
                "antidistillation profile %r (Δ mode %s, ε=%g): proxy copies %.1f MiB + KV cache %.1f MiB "
                "(%d tokens) on %s",
                name,
                mode,
                eps,
                model.parameter_bytes / 2**20,
                engine.kv.nbytes / 2**20,
                engine.kv.capacity_tokens,
                device,
            )
        control = None
        if "permutation" in settings.allowed_modes:
            control = PermutationControl(cfg.vocab_size, settings.permutation_seed)
        scales = {name: read_delta_scale(spec.gradient) for name, spec in settings.profiles.items()}
        return cls(settings, engines, control, ledger, scales)

    def add(self, index: int, args: RequestArgs, prompt: Sequence[int], output: Sequence[int]) -> None:
        """A request enters row ``index`` (replacing any previous occupant)."""
        if not args.protected:
            self.rows.remove(index)
            return
        self.rows.add(index, _Row(args, prompt_key(prompt) if args.mode == "permutation" else ""))
        self.engines[args.profile].add(index, prompt, output, args.salt)

    def add_unreadable(self, index: int, extra_args: Mapping | None, error: str) -> None:
        """A request whose arguments this worker cannot read (its settings differ from the API
        server's): it may have asked for protection, so it is refused, never served raw."""
        try:
            ticket = ticket_of(extra_args)
        except ValueError:
            ticket = None
        row = _Row(RequestArgs(ticket=ticket), "")
        self.rows.add(index, row)
        self._fail(index, row, RowFailure(Reason.BAD_ARGUMENTS, error))

    def remove(self, index: int) -> None:
        self.rows.remove(index)
        if not self.rows:  # idle until the next request: what was served is observed now
            self.doses.flush()

    def move(self, src: int, dst: int) -> None:
        """One-way move (the row at ``dst`` is dropped); the proxy KV moves with the row."""
        row = self.rows.get(src)
        self.rows.move(src, dst)
        if row is not None and row.args.protected:
            self.engines[row.args.profile].move(src, dst)

    def swap(self, a: int, b: int) -> None:
        profiles = {r.args.profile for r in (self.rows.get(a), self.rows.get(b)) if r is not None and r.args.protected}
        self.rows.swap(a, b)
        for profile in profiles:
            self.engines[profile].swap(a, b)

    def _release(self, index: int, row: _Row) -> None:
        """A row left the table: its last token's served Δ is counted, its proxy KV is freed."""
        if row.args.protected:
            engine = self.engines[row.args.profile]
            self._count_served(row, row.args.profile, engine.served_delta(index))
            engine.remove(index)
            metrics.record_kv(row.args.profile, engine.kv)

    def apply(self, logits: torch.Tensor, logits_rows: Mapping[int, int] | None = None) -> torch.Tensor:
        """Add λ·Δ to every protected row in place; withhold the rows that cannot have it.

        ``logits_rows`` maps a row index to its logits row when they differ (V2 runner: request
        slot → batch position); rows missing from it are not in this step. Rows with λ = 0 are
        never touched.
        """
        self.clock.tick(protected=bool(self.rows))
        if not self.rows:
            self.doses.flush()
            return logits
        self.doses.step()
        start = time.perf_counter()
        if logits_rows is None:
            logits_rows = {i: i for i in self.rows if i < len(logits)}
        by_profile: dict[str, list[int]] = defaultdict(list)
        for index, row in self.rows.items():
            if index in logits_rows and row.refused is None:
                by_profile[row.args.profile].append(index)
        for profile, indices in by_profile.items():
            try:
                failed = self._apply_profile(logits, self.engines[profile], indices, logits_rows)
            except Exception:  # raising here would kill the engine: find the rows that fail instead
                log.exception("antidistillation step failed for profile %r; retrying its rows one by one", profile)
                failed = self._isolate(logits, self.engines[profile], indices, logits_rows)
            for index, failure in failed.items():
                self._fail(index, self.rows[index], failure)
        refused = [logits_rows[i] for i, row in self.rows.items() if row.refused is not None and i in logits_rows]
        if refused:
            withhold(logits, refused)
        metrics.PROXY_SECONDS.inc(time.perf_counter() - start)
        return logits

    def _apply_profile(
        self, logits: torch.Tensor, engine: ProxyEngine, indices: list[int], logits_rows: Mapping[int, int]
    ) -> dict[int, RowFailure]:
        """λ·Δ for one profile's rows; returns the rows whose Δ is unavailable this step."""
        profile = self.rows[indices[0]].args.profile
        start = time.perf_counter()
        result = engine.step(indices)
        delta = result.delta
        rows = [self.rows[i] for i in indices]
        permuted = [j for j, r in enumerate(rows) if r.args.mode == "permutation"]
        if permuted and self.control is not None:
            keys = [f"{rows[j].key}:{engine.length(indices[j])}" for j in permuted]
            picked = on_device(permuted, torch.long, delta.device)
            delta[picked] = self.control.apply(delta[picked], keys)
        lambdas = on_device([r.args.lam for r in rows], torch.float32, logits.device)
        target = on_device([logits_rows[i] for i in indices], torch.long, logits.device)
        for pos, value in result.sampled.items():
            self._count_served(rows[pos], profile, value)
        metrics.record_profile_step(profile, result, len(indices), time.perf_counter() - start)
        metrics.record_kv(profile, engine.kv)
        add_scaled(logits, target, lambdas, delta.to(logits.device))  # last: a retry adds once
        return result.failed

    def _count_served(self, row: _Row, profile: str, value: torch.Tensor | None) -> None:
        """One sampled token's served Δ, for the dose metric (a profile without a Δ scale has none)."""
        scale = self.scales.get(profile)
        if value is not None and scale and row.refused is None:
            self.doses.add(row.args.tier, profile, scale, value)

    def _isolate(
        self, logits: torch.Tensor, engine: ProxyEngine, indices: list[int], logits_rows: Mapping[int, int]
    ) -> dict[int, RowFailure]:
        """After a failed batched step: one row per pass (less memory, and one bad row fails alone)."""
        failed: dict[int, RowFailure] = {}
        for index in indices:
            try:
                failed |= self._apply_profile(logits, engine, [index], logits_rows)
            except Exception as exc:
                failed[index] = RowFailure(Reason.ERROR, f"{type(exc).__name__}: {exc}")
        return failed

    def _fail(self, index: int, row: _Row, failure: RowFailure) -> None:
        """Count, log and record a row that has no Δ this step: a degrade row with a transient
        failure and steps to spare is served with Δ = 0 (once the ledger says so: unrecorded, it
        would be unprotected text the gateway cannot report), any other is withheld from now on."""
        metrics.record_fallback(row.args.profile or "*", failure.reason.label)
        if row.refused is not None:
            return
        served = row.degraded_steps + 1
        degrade = row.args.on_failure == "degrade" and failure.reason.transient and served <= DEGRADE_STEPS
        if degrade and self._record(row, failure.reason, served, refused=False):
            row.degraded_steps = served
            if served == 1:
                log.warning(
                    "antidistillation row %d (ticket %s) served with Δ = 0 (degrade, at most %d steps): %s",
                    index,
                    row.args.ticket,
                    DEGRADE_STEPS,
                    failure.message,
                )
            return
        row.refused = failure.reason
        log.warning(
            "antidistillation row %d (ticket %s) refused after %d steps with Δ = 0: %s",
            index,
            row.args.ticket,
            row.degraded_steps,
            failure.message,
        )
        self._record(row, failure.reason, row.degraded_steps, refused=True)

    def _record(self, row: _Row, reason: Reason, served: int, refused: bool) -> bool:
        """Tell the gateway: a new record for a refusal or a reason not seen yet, else the reason's
        record revised to ``served`` (failure_ledger.py). False if the ledger could not be written."""
        ticket = row.args.ticket
        if self.ledger is None or ticket is None:
            return True
        try:
            seq = row.records.get(reason)
            if refused or seq is None or not self.ledger.revise(seq, ticket, served):
                row.records[reason] = self.ledger.append(ticket, reason, served, refused)
        except OSError:  # a refused row is withheld all the same: no teacher text can come of it
            log.exception("could not record ticket %s in the failure ledger", ticket)
            return False
        return True
