"""``antidistill`` — the command operators run (``python -m antidistill.server`` is the same).

Each sub-command is a module with ``main(argv) -> int``, imported only when that command runs:
``antidistill keygen`` loads neither vLLM nor the evaluation, and the gateway has no import-time edge
to ``benchmarks``. A command with ``metrics_dir`` (``serve``) runs inside its own prometheus_client
multiprocess directory, set before its module is imported (server/startup/metrics_dir.py says why).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # defines main(argv: Sequence[str]) -> int
    summary: str  # its line in `antidistill --help`
    needs: tuple[str, ...] = ()  # import names from an optional extra, checked before the module loads
    extra: str = ""  # the extra that installs them
    metrics_dir: bool = False  # runs in a fresh PROMETHEUS_MULTIPROC_DIR, set before the module is imported


COMMANDS = {
    "serve": Command(
        "antidistill.server.startup.serve",
        "serve a teacher with antidistillation sampling (--embedded-default: the demo)",
        metrics_dir=True,
    ),
    "keygen": Command("antidistill.server.keygen", "print a new API key and its tiers-file entry"),
    "gradient": Command("antidistill.proxy_worker.tools.gradient", "compute a proxy gradient file on holdout traces"),
    "calibrate": Command(
        "antidistill.proxy_worker.tools.calibrate", "choose the finite-difference ε for a proxy and gradient"
    ),
    "tune": Command(
        "antidistill.server.tune.sweep",
        "report what each strength does to your own prompts (accuracy, trace quality, cost)",
        needs=("matplotlib",),
        extra="eval",
    ),
    "eval": Command(
        "antidistill.benchmarks.distillation.cli",
        "run or resume a distillation-attack evaluation",
        needs=("peft", "matplotlib", "reasoning_gym"),
        extra="eval",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(["usage: antidistill COMMAND [ARGS]   (antidistill COMMAND --help for its flags)", "", *lines])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    command = COMMANDS.get(argv[0]) if argv else None
    if command is None:
        print(f"antidistill: unknown command {argv[0]!r}\n" if argv else "", end="", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    missing = [name for name in command.needs if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"antidistill {argv[0]}: {', '.join(missing)} not installed: pip install 'antidistill[{command.extra}]'",
            file=sys.stderr,
        )
        return 1
    with metrics_dir() if command.metrics_dir else contextlib.nullcontext():
        return importlib.import_module(command.module).main(argv[1:])


def metrics_dir() -> contextlib.AbstractContextManager[str]:
    from antidistill.server.startup.metrics_dir import serving_metrics_dir

    return serving_metrics_dir()


if __name__ == "__main__":
    sys.exit(main())
