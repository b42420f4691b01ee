"""Our log lines in vLLM's processes: vLLM configures handlers for its own ``vllm`` logger only, so a
logger of ours without handlers would be dropped (or printed unformatted) in the worker and the API
server alike."""

from __future__ import annotations

import logging


def use_vllm_logging(name: str) -> None:
    """Route logger ``name``'s records through vLLM's handlers, with vLLM's format and level
    (``VLLM_LOGGING_LEVEL``, INFO by default: start-up memory per profile, tiers reloads, drains)."""
    ours, theirs = logging.getLogger(name), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.level or logging.INFO)
        ours.propagate = False
