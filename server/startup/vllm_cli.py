"""vLLM's `vllm serve` argument parser, start-up hooks and multi-API-server launcher, wherever the
installed release keeps them: 0.33 moved the first three from ``entrypoints.launchers.cli_args`` and
``entrypoints.serve.utils.api_utils`` to ``entrypoints.common`` (docs/vllm-compat.md). Everything of
ours that builds vLLM's parser imports it from here, so the next move is one edit."""

from __future__ import annotations

try:  # vLLM ≥ 0.33
    from vllm.entrypoints.common.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.common.startup import cli_env_setup
except ImportError:  # vLLM 0.32
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

from vllm.entrypoints.cli.serve import run_multi_api_server  # the same in 0.32 and 0.33

__all__ = ["cli_env_setup", "make_arg_parser", "run_multi_api_server", "validate_parsed_serve_args"]
