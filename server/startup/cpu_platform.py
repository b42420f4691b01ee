"""What the engine's processes need on vLLM's CPU platform: whether we are on it, how many of a
small box's cores the model gets, and an allocator that keeps freed memory.

Cores. vLLM pins its model worker's OpenMP threads and keeps one core per worker free for the
engine's scheduler process (``VLLM_CPU_NUM_OF_RESERVED_CPU``, default 1 on x86/ARM). With 2
cores that leaves the teacher and the proxy one thread. Measured on this project's 2-core box
(32 streams): reserving none gives plain vLLM 1.7× and the protected path 1.8× the throughput,
the scheduler sharing a core with a worker thread. Bigger boxes keep vLLM's default.

Memory. A decode step allocates tens of MB of transients (gathered keys, scores, logits). glibc
serves blocks over its mmap threshold (≤ 32 MB) with fresh mappings and unmaps them on free, so
whether such a block page-faults again on every layer of every step depends on the order of
earlier frees: at 32 rows × 1k context the proxy step ran 3× slower after a change of allocation
order (prepacked linears). vLLM's CPU images preload tcmalloc for this reason; where no allocator
is preloaded we ask glibc (``GLIBC_TUNABLES``) to serve everything from its heap and keep up to
1 GiB of freed memory for reuse.

Workers. vLLM binds each local CPU worker (data × pipeline × tensor parallel ranks on this host)
to a NUMA node of its own and stops ("Not enough allowed NUMA nodes") when there are more workers
than nodes. There we split the usable cores into one contiguous group per worker
(``VLLM_CPU_OMP_THREADS_BIND``, vLLM's [DP, PP, TP] order), which is what vLLM asks the operator to do.

An operator's own setting of any of these variables always wins.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
from collections.abc import Mapping, Sequence

RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
SMALL_BOX_CPUS = 2
"""At most this many usable cores: reserve none for the scheduler (the case measured)."""

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"

TUNABLES_ENV = "GLIBC_TUNABLES"
KEEP_FREED = {"glibc.malloc.mmap_max": 0, "glibc.malloc.trim_threshold": 2**30}
"""No mmap'd blocks; free memory is returned to the OS only past 1 GiB at the heap's top."""
_MALLOPT = {"glibc.malloc.mmap_max": -4, "glibc.malloc.trim_threshold": -1}  # M_MMAP_MAX, M_TRIM_THRESHOLD


def on_cpu() -> bool:
    """vLLM's platform is its CPU build (False where vLLM is not installed)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0))


def cores_env(environ: Mapping[str, str], cpus: int) -> dict[str, str]:
    """No core reserved for the scheduler on a box of at most ``SMALL_BOX_CPUS`` usable cores."""
    return {RESERVED_ENV: "0"} if RESERVED_ENV not in environ and cpus <= SMALL_BOX_CPUS else {}


def allocator_env(environ: Mapping[str, str]) -> dict[str, str]:
    """glibc keeps freed memory, unless an allocator is preloaded or the tunables are already set."""
    preloaded = any(lib in environ.get("LD_PRELOAD", "") for lib in ("tcmalloc", "jemalloc", "mimalloc"))
    if TUNABLES_ENV in environ or preloaded or platform.libc_ver()[0] != "glibc":
        return {}
    return {TUNABLES_ENV: ":".join(f"{k}={v}" for k, v in KEEP_FREED.items())}


def numa_nodes() -> int:
    """NUMA nodes of this host (1 where the kernel lists none)."""
    return max(len(glob.glob("/sys/devices/system/node/node[0-9]*")), 1)


def local_workers(tensor: int, pipeline: int, data_local: int) -> int:
    """vLLM's CPU workers on this host: one per local (data, pipeline, tensor) rank."""
    return max(tensor, 1) * max(pipeline, 1) * max(data_local, 1)


class CoresError(ValueError):
    """More CPU workers than usable cores: no binding can give each one a core."""


def bind_env(environ: Mapping[str, str], cpus: Sequence[int], nodes: int, workers: int) -> dict[str, str]:
    """One contiguous group of ``cpus`` per worker where vLLM's autobind (a NUMA node each) cannot
    place ``workers``; nothing where it can, or where the operator set the binding."""
    if BIND_ENV in environ or workers <= nodes:
        return {}
    if len(cpus) < workers:
        raise CoresError(
            f"{workers} vLLM CPU workers (data × pipeline × tensor parallel) need at least {workers} usable cores, "
            f"this host has {len(cpus)}: lower the parallel sizes"
        )
    ordered, size = sorted(cpus), len(cpus) // workers
    groups = [ordered[i * size : (i + 1) * size] for i in range(workers)]
    return {BIND_ENV: "|".join(",".join(map(str, group)) for group in groups)}


def pipeline_eager_problem(pipeline: int, eager: bool) -> str | None:
    """vLLM 0.32's CPU backend dies at the first request under pipeline parallelism in eager mode
    (its later stage asserts on intermediate tensors it never allocated); plain vLLM does the same."""
    if pipeline > 1 and eager:
        return (
            f"--pipeline-parallel-size {pipeline} with --enforce-eager stops vLLM's CPU engine at the first request "
            "(AssertionError in sync_and_gather_intermediate_tensors, plain vLLM 0.32 too): add --no-enforce-eager"
        )
    return None


def engine_env(environ: Mapping[str, str], cpus: int, workers: int = 1, nodes: int = 1) -> dict[str, str]:
    """The variables to add for a CPU engine on ``cpus`` usable cores running ``workers`` local
    workers on ``nodes`` NUMA nodes (empty: nothing to change)."""
    bound = bind_env(environ, sorted(os.sched_getaffinity(0))[:cpus], nodes, workers) if workers > 1 else {}
    return cores_env(environ, cpus) | allocator_env(environ) | bound


def apply_engine_env(added: Mapping[str, str]) -> list[str]:
    """Put ``added`` into this process's environment (spawned children read it) and, for the
    allocator, into this process's glibc now (forked children inherit it); returns a line each."""
    os.environ.update(added)
    lines = []
    if BIND_ENV in added:
        lines.append(
            f"{added[BIND_ENV].count('|') + 1} CPU workers on {numa_nodes()} NUMA node(s): cores split as "
            f"{BIND_ENV}={added[BIND_ENV]} (set {BIND_ENV} to choose otherwise)"
        )
    if RESERVED_ENV in added:
        lines.append(
            f"{usable_cpus()} usable CPU cores: the model worker gets all of them "
            f"({RESERVED_ENV}=0; set {RESERVED_ENV} to choose otherwise)"
        )
    if TUNABLES_ENV in added:
        libc = ctypes.CDLL("libc.so.6")
        for name, value in KEEP_FREED.items():
            libc.mallopt(_MALLOPT[name], value)
        lines.append(
            f"allocator: glibc keeps freed memory for reuse ({TUNABLES_ENV}={added[TUNABLES_ENV]}; "
            f"set {TUNABLES_ENV} or preload tcmalloc to choose otherwise)"
        )
    return lines
