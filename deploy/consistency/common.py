"""What every consistency check uses: the tally, the project version, and a container's args parsed as
``antidistill serve`` parses them (the server's own flags, then vLLM's parser)."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

DEPLOY = Path(__file__).resolve().parents[1]
ROOT = DEPLOY.parent
sys.path.insert(0, str(ROOT))

from antidistill.server.embedded.setup import with_vllm_defaults  # noqa: E402
from antidistill.server.gateway.trusted_gateway import SECRET_ENV  # noqa: E402
from antidistill.server.startup.flags import parse_gradient, serve_parser  # noqa: E402

IMAGE_REPO = "ghcr.io/example/antidistill"
# the embedded default's teacher in the images (their ANTIDISTILL_CACHE, then embedded/model.py's folder)
IMAGE_TEACHER = "/var/lib/antidistill/cache/SmolLM2-135M-Instruct"


class Checks:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0

    def expect(self, ok: bool, where: str, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(f"{where}: {what}")


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def vllm_parser() -> argparse.ArgumentParser:
    try:
        from antidistill.server.startup.vllm_cli import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:  # pragma: no cover - depends on the environment
        sys.exit(f"check_consistency: vLLM is not importable ({exc}); run it with the project venv (make venv)")
    return make_arg_parser(FlexibleArgumentParser(prog="antidistill serve"))


class ArgsError(Exception):
    pass


def parse_serve_args(args: list[str], vllm: argparse.ArgumentParser) -> tuple[argparse.Namespace, Any]:
    """(our namespace, vLLM's namespace) as `antidistill serve ARGS` would parse them, or ArgsError."""
    ours, rest = serve_parser().parse_known_args(args)
    if ours.embedded_default:
        rest = with_vllm_defaults(rest, IMAGE_TEACHER)  # what embedded_default adds, with the image's teacher
    elif not ours.proxy or not ours.gradient:
        raise ArgsError("--proxy and at least one --gradient NAME=PATH are required")
    for item in ours.gradient:
        try:
            parse_gradient(item)
        except ValueError as exc:
            raise ArgsError(str(exc)) from None
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            theirs = vllm.parse_args(rest)
    except SystemExit:
        last = err.getvalue().strip().splitlines()[-1:] or ["?"]
        raise ArgsError(f"vLLM rejects {shlex.join(rest)}: {last[0]}") from None
    return ours, theirs


def subset(small: dict[str, str] | None, big: dict[str, str] | None) -> bool:
    return bool(small) and all((big or {}).get(k) == v for k, v in small.items())


def under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def check_gateway_secret(c: Checks, where: str, env: dict[str, dict], ours: argparse.Namespace) -> None:
    """Trusted-gateway mode reads its secret from a Secret, never from the args (the process list)."""
    if ours.trust_gateway is None:
        c.expect(SECRET_ENV not in env, where, f"{SECRET_ENV} set without --trust-gateway: the server refuses")
        return
    c.expect(ours.trust_gateway == "", where, "--trust-gateway SECRET in the args: use the Secret")
    c.expect("secretKeyRef" in env.get(SECRET_ENV, {}).get("valueFrom", {}), where, f"{SECRET_ENV} not from a Secret")
