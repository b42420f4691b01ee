"""The prepared GPU check runs: its CPU smoke mode writes a complete report, and it needs neither vLLM
nor an installed package (the GPU machine it is meant for has torch and cannot install vLLM)."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

from antidistill.benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]
NOT_ON_A_BARE_GPU_IMAGE = {"vllm", "transformers", "pydantic", "prometheus_client", "fastapi", "httpx", "redis"}


def test_smoke_run_writes_a_complete_report(tmp_path):
    out = tmp_path / "gc"
    args = ["--device", "cpu", "--smoke", "--out", str(out), "--batches", "1", "3", "--contexts", "20", "40"]
    assert gpu_check.main(args) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    # "vllm_imported" reflects this pytest process (other modules import vLLM); the subprocess test below checks it
    assert report["complete"] and not report["skipped"]
    paths = report["meta"]["paths"]
    expected = {(d, b, c, p) for d in ("float32", "bfloat16") for b in (1, 3) for c in (20, 40) for p in paths}
    assert {(p["dtype"], p["batch"], p["context"], p["path"]) for p in report["points"]} == expected
    for point in report["points"]:
        assert point["step_ms"] > 0 and point["floor_ms"] > 0 and point["delta_finite"], point
        assert point["syncs"] is None  # counted on CUDA only
        if point["dtype"] == "bfloat16":  # compared with the fp32 reference on the same state
            assert 0 < point["rel_err_vs_fp32"] < 1, point
        if point["path"] != "reference":
            assert point["rel_err_vs_reference"] is not None
    assert {(t["batch"], t["context"]) for t in report["teacher"]} == {(b, c) for b in (1, 3) for c in (20, 40)}
    assert all("ratio_measured" in t for t in report["teacher"])
    page = (out / "gpu_check.md").read_text()
    assert "| shape | dtype | B | ctx | path |" in page and "## Targets" in page and "## Teacher stand-in" in page


def test_budget_stops_cleanly_and_lists_what_it_skipped(tmp_path):
    out = tmp_path / "gc"
    args = ["--device", "cpu", "--smoke", "--out", str(out), "--batches", "1", "--contexts", "20", "24"]
    assert gpu_check.main([*args, "--budget-seconds", "0", "--no-teacher", "--dtypes", "float32"]) == 1
    report = json.loads((out / "gpu_check.json").read_text())
    assert not report["complete"] and not report["points"]
    assert any("budget" in s for s in report["skipped"]), report["skipped"]


def test_its_imports_reach_no_vllm():
    code = (
        "import sys, antidistill.benchmarks.gpu_check\n"
        f"print(sorted(set({sorted(NOT_ON_A_BARE_GPU_IMAGE)!r}) & {{m.split('.')[0] for m in sys.modules}}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_runs_from_an_uninstalled_checkout(tmp_path):
    """The documented bootstrap (docs/benchmarks.md): the checkout linked in as the ``antidistill``
    namespace. ``-S``: no site processing, so the editable install's finder is off; torch comes from
    PYTHONPATH."""
    (tmp_path / "antidistill").symlink_to(ROOT, target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *site.getsitepackages()])}
    done = subprocess.run(
        [sys.executable, "-S", "-m", "antidistill.benchmarks.gpu_check", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert "--budget-seconds" in done.stdout


def test_the_v2_check_accepts_a_parting_only_at_a_near_tie():
    from antidistill.benchmarks.tiny.reference import LOGPROB_NOISE, agrees_up_to_noise, first_divergence

    reference, margins = [5, 6, 7, 8], [1.0, LOGPROB_NOISE / 2, 3 * LOGPROB_NOISE, 1.0]
    assert first_divergence(reference, reference) is None and agrees_up_to_noise(reference, margins, reference)
    assert first_divergence(reference, [5, 9, 9, 9]) == 1
    assert agrees_up_to_noise(reference, margins, [5, 9, 9, 9])  # parted at a near-tie: either token is right
    assert not agrees_up_to_noise(reference, margins, [5, 6, 9, 9])  # parted where the winner was clear
