"""Timing device work: each timed call starts and ends with a device synchronisation, so a median
measures the kernels and not just their launch (CUDA calls return before the work is done). The
proxy-step benchmark and the GPU check time with this, so their numbers are comparable."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    """Wait for the device's queued work (CPU work is done when the call returns)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def first_call_seconds(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call: the warm-up (compiling, caches), reported apart from the steady state."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], iters: int, device: str, warmup: int = 0) -> float:
    """Median seconds of ``iters`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, iters: int) -> float:
    """Bytes/s of a device-to-device copy of ``nbytes`` (read + write counted): the memory ceiling
    a bandwidth-bound step is judged against."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / median_seconds(lambda: y.copy_(x), iters, device, warmup=1)
