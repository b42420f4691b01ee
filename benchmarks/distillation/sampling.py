"""The evaluation's processor settings: the ``antidistillation`` object its offline engine
(proxy_worker/runtime/offline.py, the same processor the server runs) is started with."""

from __future__ import annotations

from pathlib import Path

PROFILE = "eval"


def processor_settings(proxy: Path, gradient: Path, epsilon: float, max_lambda: float, budget: int) -> dict:
    """The ``antidistillation`` settings object, exactly as ``antidistill serve`` would pass it."""
    return {
        "proxy": str(proxy),
        "profiles": {PROFILE: {"gradient": str(gradient), "epsilon": epsilon}},
        "allowed_modes": ["ad", "permutation"],
        "max_lambda": max_lambda,
        "token_budget": budget,
    }
