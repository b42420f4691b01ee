"""What stands between a decode step and a CUDA graph: host synchronisations (a step that syncs
cannot be captured, and each sync stalls the launch queue), and the capture itself, whose replay
is the launch-free floor of a step."""

from __future__ import annotations

import gc
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from antidistill.benchmarks.gpu_steps import forward_fn, rel_err
from antidistill.benchmarks.timing import median_seconds, sync
from antidistill.proxy_worker.core.model import StackedProxy


def count_syncs(fn: Callable[[], object], device: str) -> tuple[int | None, dict[str, int]]:
    """Host synchronisations of one call, by source line (CUDA only: ``set_sync_debug_mode("warn")``)."""
    if not device.startswith("cuda"):
        return None, {}
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    sites = Counter(f"{_short(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower())
    return sum(sites.values()), dict(sites.most_common())


def _short(filename: str) -> str:
    parts = Path(filename).parts
    for anchor in ("proxy_worker", "benchmarks", "torch"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) :])
    return filename


def graph_replay(model: StackedProxy, batch: int, context: int, path: str, device: str, iters: int) -> dict:
    """Capture one decode forward (prebuilt plan) in a CUDA graph and time its replay: the
    launch-free floor item 4 aims at. A forward that syncs cannot be captured: then the sync sites
    are reported and nothing is captured (a failed capture can leave the stream unusable)."""
    if not device.startswith("cuda"):
        return dict(status="n/a on cpu")
    step = forward_fn(model, batch, context, device, path)
    try:
        eager = step()
        syncs, sites = count_syncs(step, device)
        if syncs:
            return dict(status=f"not capturable: {syncs} host syncs", sync_sites=sites)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        sync(device)
        return dict(
            status="captured",
            replay_ms=1e3 * median_seconds(graph.replay, iters, device),
            rel_err_vs_eager=rel_err(captured, eager),
        )
    except Exception as exc:  # report why the step cannot be captured; the check goes on
        return dict(status=f"not capturable: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    finally:
        del step
        gc.collect()
