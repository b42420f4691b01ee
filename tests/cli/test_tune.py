"""`antidistill tune` end to end on the tiny models: the real processor in vLLM's offline engine, and
the report's figures recomputed independently (HF reference sampler, HF teacher scores)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from antidistill.benchmarks.tiny.models import load_hf
from antidistill.benchmarks.tiny.reference import ReferenceSampler, agrees_up_to_noise
from antidistill.benchmarks.tiny.serving import EPSILONS, build_models
from antidistill.proxy_worker.core.config import load_config
from antidistill.proxy_worker.core.gradient_file import (
    DELTA_SCALE_KEY,
    load_gradient,
    read_delta_scale,
    read_metadata,
    save_gradient,
)
from antidistill.server.cli import main as cli_main
from antidistill.server.tune.report import PLOT_SIZE

from tests.helpers import engine_fixture

PROMPTS = ["Alice has 3 apples and", "The sum of 12 and 30", "Question 4: how many", "Bob buys 5 more, so"]
STRENGTHS = (30.0, 60.0)  # λ ≈ 1.4 and 2.8 on the tiny math gradient (s ≈ 22)
TIER_STRENGTH = 45.0
MAX_TOKENS = 12


@dataclass(frozen=True)
class TuneRun:
    models: object
    out: Path
    argv: list[str]
    code: int
    stdout: str


@engine_fixture(scope="module")
def tuned(tmp_path_factory) -> TuneRun:
    root = tmp_path_factory.mktemp("tune")
    models = build_models(root / "models")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    tiers = root / "tiers.yaml"
    tiers.write_text(yaml.safe_dump({"tiers": {"free": {"strength": TIER_STRENGTH}, "internal": {"lambda": 0.0}}}))
    out = root / "report"
    argv = [
        "tune",
        "--model",
        str(models.teacher),
        "--proxy",
        str(models.proxy),
        "--gradient",
        f"math={models.gradients['math']}",
        "--prompts",
        str(prompts),
        "--strengths",
        ",".join(f"{b:g}" for b in STRENGTHS),
        "--tiers",
        str(tiers),
        "--temperature",
        "0",
        "--max-tokens",
        str(MAX_TOKENS),
        "--epsilon",
        str(EPSILONS["math"]),
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "4",
        "--kv-cache-gib",
        "1",
        "--out",
        str(out),
    ]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli_main(argv)
    return TuneRun(models, out, argv, code, buffer.getvalue())


def point_file(run: TuneRun, strength: float) -> dict:
    return json.loads((run.out / "points" / f"math-{strength:.6g}.json").read_text())


def test_tune_writes_the_report_files_and_recommendations(tuned):
    assert tuned.code == 0, tuned.stdout
    report = json.loads((tuned.out / "tune.json").read_text())
    strengths = [p["strength"] for p in report["points"]]
    assert strengths == sorted({0.0, *STRENGTHS, TIER_STRENGTH}), "the sweep, 0 and the tiers' strengths"
    assert {t["tier"]: t["strength"] for t in report["tiers"]} == {"free": pytest.approx(TIER_STRENGTH), "internal": 0}
    assert {r["profile"] for r in report["recommendations"]} == {"math"}
    assert "strength ≤" in tuned.stdout
    page = (tuned.out / "tune.md").read_text()
    assert "## Recommendation" in page and "## Samples" in page and "![strength sweep](tune.png)" in page
    png = (tuned.out / "tune.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == PLOT_SIZE, "IHDR width × height"


def test_a_strength_is_served_at_lambda_strength_over_scale(tuned):
    """The tokens of strength b are the independent reference sampler's at λ = b / s."""
    scale = read_delta_scale(tuned.models.gradients["math"])
    theta, grad = tuned.models.theta_and_grad("math")
    sampler = ReferenceSampler(tuned.models.teacher, tuned.models.proxy, theta, grad, EPSILONS["math"])
    b = STRENGTHS[1]
    point = point_file(tuned, b)
    assert point["lambda"] == pytest.approx(b / scale)
    tok = tuned.models.tokenizer
    changed = 0
    for prompt, done in zip(PROMPTS, point["completions"], strict=True):
        ids = tok(prompt)["input_ids"]
        expected, margins = sampler.greedy(ids, b / scale, MAX_TOKENS)
        assert agrees_up_to_noise(expected, margins, done["token_ids"]), (prompt, done["token_ids"], expected)
        changed += expected != sampler.generate(ids, 0.0, MAX_TOKENS)
    assert changed, "strength b must change some greedy completion for this test to mean anything"


def test_reported_figures_recomputed_independently(tuned):
    """Agreement with strength 0 and the teacher's NLL of the emitted tokens, recomputed from the kept
    completions with the HF teacher: the report's numbers for that strength."""
    b = STRENGTHS[1]
    report = json.loads((tuned.out / "tune.json").read_text())
    row = next(p for p in report["points"] if p["strength"] == b)
    base, point = point_file(tuned, 0.0), point_file(tuned, b)
    same = [
        c["text"].strip() == z["text"].strip() for c, z in zip(point["completions"], base["completions"], strict=True)
    ]
    assert row["accuracy"] == pytest.approx(sum(same) / len(same))
    assert row["accuracy_kind"] == "agreement with strength 0"
    teacher = load_hf(tuned.models.teacher)
    tok = tuned.models.tokenizer
    nll, tokens = 0.0, 0
    for prompt, done in zip(PROMPTS, point["completions"], strict=True):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(teacher(torch.tensor([[*ids, *done["token_ids"]]])).logits[0].double(), dim=-1)
        nll -= sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(done["token_ids"]))
        tokens += len(done["token_ids"])
    assert row["teacher_nll"] == pytest.approx(nll / tokens, abs=1e-3)
    assert row["mean_tokens"] == tokens / len(PROMPTS)


def test_a_rerun_with_the_same_inputs_reuses_every_point(tuned, capsys):
    files = sorted((tuned.out / "points").glob("*.json"))
    before = {f: os.stat(f).st_mtime_ns for f in files}
    assert cli_main(tuned.argv) == 0
    assert {f: os.stat(f).st_mtime_ns for f in files} == before, "no point was recomputed"
    assert "strength ≤" in capsys.readouterr().out


def test_a_gradient_without_a_scale_is_one_line(tuned, tmp_path, capsys):

    source = tuned.models.gradients["math"]
    old = tmp_path / "old.safetensors"
    meta = {k: v for k, v in read_metadata(source).items() if k != DELTA_SCALE_KEY}
    save_gradient(old, load_gradient(source, load_config(tuned.models.proxy)), meta)
    argv = [a if not a.startswith("math=") else f"math={old}" for a in tuned.argv]
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "stores no Δ scale" in err and "antidistill gradient --add-scale" in err and "\n" not in err


def test_the_dose_column_is_the_traces_likelihood_slope_along_g(tuned):
    """Each strength's dose, recomputed from its kept completions with HF proxies at θ ± εg: the mean,
    over traces, of d/dε log p(completion) per token, over s. Protection raises it above strength 0."""
    scale = read_delta_scale(tuned.models.gradients["math"])
    theta, grad = tuned.models.theta_and_grad("math")
    sampler = ReferenceSampler(tuned.models.teacher, tuned.models.proxy, theta, grad, EPSILONS["math"])
    rows = {p["strength"]: p for p in json.loads((tuned.out / "tune.json").read_text())["points"]}
    tok = tuned.models.tokenizer
    for b in (0.0, *STRENGTHS):
        slopes = []
        for prompt, done in zip(PROMPTS, point_file(tuned, b)["completions"], strict=True):
            ids = [*tok(prompt)["input_ids"], *done["token_ids"]]
            start = len(ids) - len(done["token_ids"])
            with torch.no_grad():
                logs = [torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), -1) for m in sampler.proxies]
            plus, minus = (sum(float(lp[t - 1, ids[t]]) for t in range(start, len(ids))) for lp in logs)
            slopes.append((plus - minus) / (2 * sampler.epsilon) / len(done["token_ids"]) / scale)
        assert rows[b]["dose"] == pytest.approx(sum(slopes) / len(slopes), rel=2e-2, abs=1e-4), b
    assert rows[STRENGTHS[1]]["dose"] > rows[0.0]["dose"]
    assert "| dose |" in (tuned.out / "tune.md").read_text()
