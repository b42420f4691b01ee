"""``antidistill eval CONFIG [--out DIR]``: run (or resume) a distillation-attack evaluation."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from antidistill.benchmarks.distillation.config import ConfigError, load_eval_config
from antidistill.benchmarks.distillation.pipeline import Pipeline, RunDirBusy
from antidistill.benchmarks.distillation.sampling import SweepFailed
from antidistill.server.startup.cpu_platform import apply_engine_env, engine_env, on_cpu, usable_cpus

DEFAULT_ROOT = Path("runs")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="antidistill eval", description=__doc__)
    ap.add_argument("config", help="packaged config name (micro, toy, toy-slips, smollm2-tiny-task, …) or a YAML path")
    ap.add_argument(
        "--out", type=Path, help="run directory (default: runs/<config name>); rerun to resume, or after a config edit"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if on_cpu():  # before the sweep and traces stages start vLLM's processes
        for line in apply_engine_env(engine_env(os.environ, usable_cpus())):
            logging.getLogger("antidistill.eval").info(line)
    try:
        cfg = load_eval_config(args.config)
        report = Pipeline(cfg, args.out or DEFAULT_ROOT / cfg.name).run()
    except (ConfigError, RunDirBusy, SweepFailed) as exc:
        print(f"antidistill eval: {exc}")
        return 2
    print(f"report: {report / 'summary.md'}")
    return 0
