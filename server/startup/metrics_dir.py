"""The multiprocess metrics directory of one ``antidistill serve`` (``PROMETHEUS_MULTIPROC_DIR``).

Worker-side metrics reach /metrics through prometheus_client's multiprocess mode, which every
process decides ONCE, when it first imports prometheus_client: a process that imported it before the
variable was set keeps its metrics in memory, where the multiprocess /metrics never reads them (a
first ``make serve``, whose in-process preparation imported vLLM, lost all ``vllm:*`` and gateway
series that way). So the CLI enters ``serving_metrics_dir`` before it imports the ``serve`` command
at all: nothing of start-up, preparation or vLLM can run in this process before the directory is set.

Its files follow the server's lifetime, not the variable's: removed when the command returns or
raises (an uncaught SIGTERM before vLLM's own handlers is turned into ``SystemExit``, so that counts
too); a server killed outright (SIGKILL, as the fault tests do) cannot clean up, so each start removes
the directories whose owner is gone. The owner holds an exclusive ``flock`` on ``.owner.lock`` inside
its directory for as long as it (or a child that inherited the lock) lives; the kernel drops the lock
when they die, however they die, so a live server's directory is never taken: not on a reused pid,
not from another pid namespace sharing the temp dir. Directories younger than ``GRACE`` seconds are
left alone (one being made right now has no lock yet), as are older ones without a lock file (made by
an earlier version) while a process named in their ``*_<pid>.db`` files lives.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "antidistill-metrics-"
LOCK = ".owner.lock"  # prometheus_client reads only *.db files
GRACE = 60.0  # seconds during which a new directory is never swept
_DB_PID = re.compile(r"_(\d+)\.db$")


@contextlib.contextmanager
def serving_metrics_dir() -> Iterator[str]:
    """``ENV`` set to a fresh directory (stale ones swept first) while the block runs; afterwards the
    directory is removed and ``ENV`` unset again. An ``ENV`` already set (by the operator, or a test)
    is used as it is and left alone."""
    given = os.environ.get(ENV)
    if given:
        yield given
        return
    sweep_stale()
    path, lock = _claim()
    os.environ[ENV] = path
    restore = _sigterm_as_exit()
    try:
        yield path
    finally:
        restore()
        if os.environ.get(ENV) == path:
            del os.environ[ENV]
        shutil.rmtree(path, ignore_errors=True)
        os.close(lock)


def fresh_metrics_dir() -> None:
    """For a caller that runs the ``serve`` command without the CLI: the directory, if none is set
    yet, until this process exits. The CLI's ``serving_metrics_dir`` has set it before anything else."""
    if os.environ.get(ENV):
        return
    stack = contextlib.ExitStack()
    stack.enter_context(serving_metrics_dir())
    atexit.register(stack.close)


def sweep_stale(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Remove this user's metrics directories whose owner is gone; returns those removed."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            info = path.lstat()
        except OSError:
            continue
        if not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid() or _in_use(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _claim() -> tuple[str, int]:
    """A new directory and the descriptor that holds its lock (kept open until it is removed)."""
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return path, fd


def _in_use(path: Path) -> bool:
    try:
        newest = max(path.stat().st_mtime, *(p.stat().st_mtime for p in path.iterdir()))
    except OSError:
        return True  # vanishing or unreadable: not ours to judge
    if time.time() - newest < GRACE:
        return True
    try:
        fd = os.open(path / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:  # an earlier version's directory: judged by the pids in its file names
        return any(_alive(int(m.group(1))) for p in path.iterdir() if (m := _DB_PID.search(p.name)))
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True  # its owner holds the lock
    finally:
        os.close(fd)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sigterm_as_exit():
    """Until the returned function is called, an otherwise fatal SIGTERM raises ``SystemExit(143)``
    (the status a SIGTERM death reports), so ``finally`` blocks and atexit still run. Only where the
    default action was in place and this is the main thread; vLLM and the gateway install their own
    SIGTERM handlers later, which replace this one."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return lambda: None

    def exit_now(signum: int, _frame: object) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, exit_now)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is exit_now:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return restore
