"""Start a server process on a free loopback port and wait until it is healthy (benchmarks, tests)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies, so a test run
    killed before its teardown takes its servers with it (they drain and stop their engines)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def running_server(
    args: Sequence[str], env: Mapping[str, str], log_path: Path, port: int, timeout: float = 300
) -> Iterator[str]:
    """Run ``python args...`` until ``/health`` answers 200; yield the base URL; stop it after."""
    with server_process(args, env, log_path, port, timeout) as (base, _):
        yield base


@contextmanager
def server_process(
    args: Sequence[str], env: Mapping[str, str], log_path: Path, port: int, timeout: float = 300
) -> Iterator[tuple[str, subprocess.Popen]]:
    """As ``running_server``, also yielding the process (fault tests signal it and read its exit status)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *args],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not healthy after {timeout} s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
            yield base, proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
