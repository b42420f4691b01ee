"""Protection of a teacher batch: which rows are protected, with which profile, λ and mode, and
the per-step ``logits[row] += λ · Δ_row``.

This is the one object the vLLM adapters talk to. It never raises from ``apply``: an exception in
a logits processor kills the engine, so a failure costs the affected rows their protection for
that step (logged and counted) and nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from proxy_worker import metrics
from proxy_worker.config import load_config
from proxy_worker.delta import PermutationControl, add_scaled
from proxy_worker.engine import ProxyEngine, parse_dtype
from proxy_worker.gradient_file import load_gradient
from proxy_worker.model import StackedProxy
from proxy_worker.settings import ProcessorSettings, RequestArgs
from proxy_worker.validation import check_proxy_matches_teacher
from proxy_worker.weights import load_proxy_state, stack_perturbed

log = logging.getLogger(__name__)


def failure_kind(reason: str) -> str:
    """Metric label for why a row went unprotected for a step."""
    return "non_finite" if "non-finite" in reason else "budget" if "budget" in reason else "other"


@dataclass
class _Row:
    args: RequestArgs
    key: str  # stable identity of the request's prompt, for the permutation control's signs


def prompt_key(prompt: Sequence[int]) -> str:
    return hashlib.blake2b(repr(list(prompt)).encode(), digest_size=8).hexdigest()


class Protection:
    """Rows keyed by batch index, one ProxyEngine per gradient profile."""

    def __init__(
        self, settings: ProcessorSettings, engines: dict[str, ProxyEngine], control: PermutationControl | None
    ) -> None:
        self.settings = settings
        self.engines = engines
        self.control = control
        self.rows: dict[int, _Row] = {}
        self.clock = metrics.StepClock()
        for name, engine in engines.items():
            metrics.record_kv(name, engine.cache.used_tokens, engine.cache.capacity_tokens)

    @classmethod
    def from_settings(
        cls,
        settings: ProcessorSettings,
        device: torch.device | str = "cpu",
        teacher_tokenizer: str | None = None,
        teacher_width: int | None = None,
    ) -> Protection:
        """Load the proxy once and one θ ± εg pair per profile; check the proxy against the teacher."""
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
            params = stack_perturbed(theta, load_gradient(spec.gradient, cfg), (eps, -eps), cfg, dtype, device)
            model = StackedProxy(cfg, params, device)
            engines[name] = engine = ProxyEngine(model, eps, settings.token_budget)
            log.info(
                "antidistillation profile %r (ε=%g): proxy copies %.1f MiB + KV cache %.1f MiB (%d tokens) on %s",
                name,
                eps,
                model.parameter_bytes / 2**20,
                engine.cache.nbytes / 2**20,
                engine.cache.capacity_tokens,
                device,
            )
        control = None
        if "permutation" in settings.allowed_modes:
            control = PermutationControl(cfg.vocab_size, settings.permutation_seed)
        return cls(settings, engines, control)

    def add(self, index: int, args: RequestArgs, prompt: Sequence[int], output: Sequence[int]) -> None:
        """A request enters row ``index`` (replacing any previous occupant)."""
        self.remove(index)
        if args.protected:
            self.engines[args.profile].add(index, prompt, output)
            self.rows[index] = _Row(args, prompt_key(prompt) if args.mode == "permutation" else "")

    def remove(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None:
            engine = self.engines[row.args.profile]
            engine.remove(index)
            metrics.record_kv(row.args.profile, engine.cache.used_tokens, engine.cache.capacity_tokens)

    def move(self, src: int, dst: int) -> None:
        self.remove(dst)
        row = self.rows.pop(src, None)
        if row is not None:
            self.engines[row.args.profile].move(src, dst)
            self.rows[dst] = row

    def swap(self, a: int, b: int) -> None:
        ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
        for profile in {r.args.profile for r in (ra, rb) if r is not None}:
            self.engines[profile].swap(a, b)
        if ra is not None:
            self.rows[b] = ra
        if rb is not None:
            self.rows[a] = rb

    def apply(self, logits: torch.Tensor, logits_rows: Mapping[int, int] | None = None) -> torch.Tensor:
        """Add λ·Δ to every protected row in place; rows with λ = 0 are never touched.

        ``logits_rows`` maps a row index to its logits row when they differ (V2 runner: request
        slot → batch position); rows missing from it are not in this step.
        """
        self.clock.tick(protected=bool(self.rows))
        if not self.rows:
            return logits
        start = time.perf_counter()
        try:
            for profile, engine in self.engines.items():
                indices = [
                    i
                    for i, r in self.rows.items()
                    if r.args.profile == profile and (i in logits_rows if logits_rows is not None else i < len(logits))
                ]
                if indices:
                    targets = [logits_rows[i] for i in indices] if logits_rows is not None else indices
                    self._apply_profile(logits, engine, indices, targets)
        except Exception:
            log.exception("antidistillation step failed; protected rows fall back to Δ = 0 for this step")
            metrics.record_fallback("*", "other")
        metrics.PROXY_SECONDS.inc(time.perf_counter() - start)
        return logits

    def _apply_profile(self, logits: torch.Tensor, engine: ProxyEngine, indices: list[int], targets: list[int]) -> None:
        profile = self.rows[indices[0]].args.profile
        start = time.perf_counter()
        result = engine.step(indices)
        delta = result.delta
        rows = [self.rows[i] for i in indices]
        permuted = [j for j, r in enumerate(rows) if r.args.mode == "permutation"]
        if permuted and self.control is not None:
            keys = [f"{rows[j].key}:{engine.cache.rows[indices[j]].length}" for j in permuted]
            delta[permuted] = self.control.apply(delta[permuted], keys)
        for index, reason in result.failed.items():
            metrics.record_fallback(profile, failure_kind(reason))
            log.warning("antidistillation row %d unprotected this step: %s", index, reason)
        lambdas = torch.tensor([r.args.lam for r in rows], dtype=torch.float32, device=delta.device)
        target = torch.tensor(targets, device=logits.device)
        add_scaled(logits, target, lambdas.to(logits.device), delta.to(logits.device))
        metrics.record_profile_step(profile, result, len(indices), time.perf_counter() - start)
        metrics.record_kv(profile, engine.cache.used_tokens, engine.cache.capacity_tokens)
