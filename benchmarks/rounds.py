"""Rounds of the overhead benchmark (``benchmarks/overhead.py``): one warm-up round per target and
point, never aggregated, then ≥ ``MIN_ROUNDS`` measured rounds in a rotating order, summarised as
the median with its spread (min–max over the measured rounds).

Why a warm-up: the first round of a point runs on a cold prefix cache (and cold allocator pools);
on the mixed workload plain vLLM measured 81.5 then 116.7 tok/s at 32 streams in one run, which put
λ = 0 at 0.89× vanilla by noise alone. Why min–max rather than the IQR: with 3–5 rounds an
interquartile range is an interpolation between two or three values; min–max shows every round.

Ratios (λ > 0 / vanilla, ...) are the ratio of the medians, with the spread of the per-round ratios
(round r of one target over round r of the other, measured next to each other in the same round).
The ratio of the medians always lies within that spread: median is monotone and scale-equivariant,
so a_i ≤ M·b_i for every round gives median(a) ≤ M·median(b).

Pure Python: the unit tests drive ``measure_rounds`` with a fake measurement.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

MIN_ROUNDS = 3
SPREAD = "min-max over the measured rounds (warm-up excluded)"
"""What ``min`` and ``max`` of every summary mean (written into the JSON beside them)."""

L = TypeVar("L")


def check_rounds(rounds: int) -> None:
    """Refuse fewer than ``MIN_ROUNDS`` measured rounds: a median of two is their mean, and one
    round has no spread (the run that put λ = 0 at 0.89× vanilla had two)."""
    if rounds < MIN_ROUNDS:
        raise ValueError(
            f"--rounds {rounds}: at least {MIN_ROUNDS} measured rounds are needed for a median with a spread "
            f"(each point also runs one warm-up round first, not counted)"
        )


def round_order(targets: Sequence[str], r: int) -> list[str]:
    """Round r's order: the targets rotated by r, so each goes first in turn (round 0: as given)."""
    k = r % len(targets)
    return [*targets[k:], *targets[:k]]


@dataclass
class Rounds:
    """One target at one point: its warm-up value (recorded, never aggregated) and its measured rounds."""

    warmup: float | None = None
    measured: list[float] = field(default_factory=list)


def spread(values: Sequence[float]) -> dict:
    """Median, min, max and every value (in round order) of the measured rounds."""
    if not values:
        raise ValueError("no measured rounds")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": list(values)}


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> dict:
    """``value``: median(numerator) / median(denominator); ``min``/``max``/``rounds``: the per-round
    ratios, round r over round r (``value`` always lies within them)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"{len(numerator)} rounds against {len(denominator)}")
    per_round = [a / b for a, b in zip(numerator, denominator, strict=True)]
    value = statistics.median(numerator) / statistics.median(denominator)
    return {"value": value, "min": min(per_round), "max": max(per_round), "rounds": per_round}


def summary(rounds: Rounds) -> dict:
    """``spread`` of the measured rounds plus the warm-up value, kept apart."""
    return {**spread(rounds.measured), "warmup": rounds.warmup}


def format_spread(stats: Mapping, width: int = 7, digits: int = 1) -> str:
    """``median [min–max]``, or for a ratio ``value [min–max]``; ``3 * width + 2`` characters when
    the values fit ``width`` (so columns line up)."""
    centre = stats["median"] if "median" in stats else stats["value"]
    bracket = f"[{stats['min']:.{digits}f}–{stats['max']:.{digits}f}]"
    return f"{centre:>{width}.{digits}f} {bracket:<{2 * width + 1}}"


def measure_rounds(
    points: Mapping[str, L],
    targets: Sequence[str],
    rounds: int,
    measure: Callable[[str, L], float],
    log: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, Rounds]], dict[str, list[list[str]]]]:
    """For each point: one warm-up round through every target (in the given order), then ``rounds``
    measured rounds in ``round_order``. Returns {point: {target: Rounds}} and, per point, the order
    of every measured round."""
    check_rounds(rounds)
    results: dict[str, dict[str, Rounds]] = {}
    orders: dict[str, list[list[str]]] = {}
    for label, load in points.items():
        point = results[label] = {t: Rounds() for t in targets}
        for target in targets:
            point[target].warmup = value = measure(target, load)
            log(f"{label:<10} warm-up  {target:<16} {value:8.1f} tok/s (not counted)")
        orders[label] = []
        for r in range(rounds):
            order = round_order(targets, r)
            orders[label].append(order)
            for target in order:
                value = measure(target, load)
                point[target].measured.append(value)
                log(f"{label:<10} round {r:<2} {target:<16} {value:8.1f} tok/s")
    return results, orders
