"""The overhead benchmark's rounds: a warm-up round per target that no median counts, ≥ 3 measured
rounds in a rotating order, medians with their min–max spread, ratios with the per-round spread,
and the JSON that keeps them apart (no server is started: a fake measurement stands in)."""

from __future__ import annotations

import json

import pytest
from antidistill.benchmarks.overhead import (
    BASE,
    HEADER,
    VARIANTS,
    Workload,
    mode_variants,
    parse_args,
    point_row,
    row_lines,
    samples_json,
    warmup_json,
)
from antidistill.benchmarks.rounds import (
    MIN_ROUNDS,
    Rounds,
    check_rounds,
    format_spread,
    measure_rounds,
    ratio,
    round_order,
    spread,
)
from antidistill.proxy_worker.core.delta_mode import DeltaMode

TARGETS = ["vanilla", "lambda_0", "lambda_pos"]
STEADY = {"vanilla": 116.0, "lambda_0": 118.0, "lambda_pos": 52.0}


def cold_first(calls: list[tuple[str, str]]):
    """A fake measurement: each (target, point)'s first run is on a cold cache (a tenth of its
    steady value, far below it), later runs steady with a small drift per run."""

    def measure(target: str, load: str) -> float:
        calls.append((target, load))
        n = sum(1 for c in calls if c == (target, load))
        return STEADY[target] / 10 if n == 1 else STEADY[target] + (n - 2)

    return measure


def test_the_warm_up_round_is_recorded_and_in_no_median_spread_or_ratio():
    calls: list[tuple[str, str]] = []
    results, orders = measure_rounds({"mixed/32": "mixed/32"}, TARGETS, 3, cold_first(calls), log=lambda _: None)
    point = results["mixed/32"]
    # every target runs the warm-up first, then the three measured rounds
    assert calls[:3] == [(t, "mixed/32") for t in TARGETS] and len(calls) == 4 * len(TARGETS)
    for target, steady in STEADY.items():
        assert point[target].warmup == steady / 10
        assert point[target].measured == [steady, steady + 1, steady + 2]
    stats = spread(point["vanilla"].measured)
    # counted, the cold warm-up would make the median 116.5 and the min 11.6
    assert (stats["median"], stats["min"], stats["max"]) == (117.0, 116.0, 118.0)
    load = Workload("mixed", 32, ["q"] * 64, [100] * 64, False)
    row = point_row(load, point, 0.5, 10.0, VARIANTS[0].targets(), orders["mixed/32"])
    assert row["vanilla_tok_s"] == 117.0 and row["lambda_pos_tok_s"] == 53.0
    assert row["targets"]["vanilla"]["tok_s"]["warmup"] == 11.6
    assert row["lambda_pos_over_vanilla"] == pytest.approx(53 / 117)  # not (5.2, 52, 53, 54) over (11.6, ...)
    assert row["share_of_bound"] == pytest.approx(53 / 117 / 0.5)
    assert row["lambda_pos_over_official"] == pytest.approx(5.3)
    assert row["targets"]["lambda_pos"]["over_vanilla"]["rounds"] == pytest.approx([52 / 116, 53 / 117, 54 / 118])
    assert samples_json(results)["mixed/32/vanilla"] == [116.0, 117.0, 118.0]
    assert warmup_json(results)["mixed/32/vanilla"] == 11.6


def test_rounds_rotate_so_each_target_goes_first_in_turn():
    calls: list[tuple[str, str]] = []
    _, orders = measure_rounds({"p": "p"}, TARGETS, 4, cold_first(calls), log=lambda _: None)
    assert [o[0] for o in orders["p"]] == ["vanilla", "lambda_0", "lambda_pos", "vanilla"]
    assert all(sorted(o) == sorted(TARGETS) for o in orders["p"])
    assert round_order(TARGETS, 5) == ["lambda_pos", "vanilla", "lambda_0"]


def test_fewer_than_three_measured_rounds_are_refused(capsys):
    assert MIN_ROUNDS == 3 and parse_args([]).rounds == 3
    check_rounds(3)
    with pytest.raises(ValueError, match="at least 3 measured rounds"):
        measure_rounds({"p": "p"}, TARGETS, 2, cold_first([]), log=lambda _: None)
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "2"])
    assert "--rounds 2: at least 3 measured rounds" in capsys.readouterr().err
    assert parse_args(["--rounds", "5"]).rounds == 5


def test_a_ratio_of_medians_lies_within_the_per_round_ratios():
    a, b = [52.0, 47.0, 60.0, 45.0], [110.0, 118.0, 101.0, 116.0]
    r = ratio(a, b)
    assert r["value"] == pytest.approx((49.5) / (113.0))
    assert r["min"] <= r["value"] <= r["max"]
    assert r["rounds"] == pytest.approx([x / y for x, y in zip(a, b, strict=True)])
    with pytest.raises(ValueError):
        ratio([1.0, 2.0, 3.0], [1.0, 2.0])


def test_rows_print_the_spread_beside_each_median_and_ratio_with_a_row_per_variant():
    base, head = mode_variants([DeltaMode.parse("head")])
    assert head.targets() == {"lambda_pos@head": "lambda_pos"} and base == VARIANTS[0] and base.name == BASE
    assert head.mode == DeltaMode("head") and base.mode.kind == "full"
    point = {
        "vanilla": Rounds(81.5, [116.7, 110.2, 118.0]),
        "lambda_0": Rounds(70.0, [118.1, 112.0, 119.9]),
        "lambda_pos": Rounds(30.0, [52.0, 50.1, 53.3]),
        "lambda_pos@head": Rounds(40.0, [60.0, 61.0, 62.0]),
    }
    load = Workload("mixed", 32, ["q"] * 64, [100] * 64, False)
    row = point_row(load, point, 0.452, 7.3, {**VARIANTS[0].targets(), **head.targets()})
    lines = row_lines(row)
    assert lines[0].split()[:5] == ["mixed", "32", "vanilla", "116.7", "[110.2–118.0]"]
    assert "1.012 [1.012–1.016]" in lines[1]
    assert format_spread(row["targets"]["lambda_pos@head"]["over_vanilla"], 6, 3) in lines[3]
    assert row["share_of_bound@head"] == pytest.approx(61 / 116.7 / 0.452)
    assert lines[-1].endswith("7.3 (one run)") and len(lines) == 5
    assert HEADER.index("/ vanilla") == lines[1].index("1.012") - 1  # the ratio column under its header
    json.dumps(row)  # the row goes into the JSON as it is


def test_main_writes_warm_up_rounds_spreads_and_variants_into_the_json(tmp_path, monkeypatch, capsys):
    """``main`` end to end with the servers, models and official style faked out."""
    from contextlib import nullcontext

    import antidistill.benchmarks.overhead as overhead

    calls: list[tuple[str, str]] = []
    measure = cold_first(calls)
    monkeypatch.setattr(overhead, "engine_env", lambda env, cpus: {})
    monkeypatch.setattr(overhead, "apply_engine_env", lambda added: [])
    for name in ("prepare_smollm2", "prepare_half_proxy", "benchmark_gradient"):
        monkeypatch.setattr(overhead, name, lambda *a, **k: tmp_path)
    monkeypatch.setattr(overhead, "parameter_count", lambda path: 100)
    monkeypatch.setattr(overhead, "workload", lambda w, c, m: Workload(w, c, ["q"] * 4, [m] * 4, w == "equal"))
    monkeypatch.setattr(overhead, "ExitStack", nullcontext)
    monkeypatch.setattr(overhead, "start_servers", lambda *a: {t: (t, "") for t in TARGETS})  # base URL = target name
    monkeypatch.setattr(overhead, "http_tokens_per_second", lambda base, key, load: measure(base, load.name))
    monkeypatch.setattr(overhead, "official_tokens_per_second", lambda *a: {(w, 32): 10.0 for w in ("equal", "mixed")})
    out = tmp_path / "overhead.json"
    overhead.main(["--concurrency", "32", "--workloads", "mixed", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["rounds"] == 3 and result["warmup_rounds"] == 1 and result["spread"].startswith("min-max")
    assert result["variants"] == [
        {
            "name": BASE,
            "serve_args": [],
            "targets": {"lambda_0": "lambda_0", "lambda_pos": "lambda_pos"},
            "delta_mode": "full",
        }
    ]
    assert result["warmup"]["mixed/32/vanilla"] == 11.6
    assert result["samples"]["mixed/32/vanilla"] == [116.0, 117.0, 118.0]
    (row,) = result["rows"]
    assert row["vanilla_tok_s"] == 117.0 and row["targets"]["lambda_pos"]["tok_s"]["min"] == 52.0
    assert row["round_order"][1] == ["lambda_0", "lambda_pos", "vanilla"]
    printed = capsys.readouterr().out
    assert "warm-up" in printed and "not counted" in printed
    assert "mixed      32 vanilla            117.0 [116.0–118.0]" in printed
