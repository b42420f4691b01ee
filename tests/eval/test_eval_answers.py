"""Answer extraction and checking for the distillation evaluation (pure functions)."""

from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest
from antidistill.benchmarks.distillation.tasks import chain_solution, make_splits, near_misses
from antidistill.benchmarks.distillation.trace_stats import chain_trace_stats, style_of
from antidistill.proxy_worker.core.answers import extract_answer, is_correct, parse_number
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("first #### 5 then\n#### 6", "6"),
        ("so the answer is \\boxed{42}.", "42"),
        ("#### 1\nactually \\boxed{2}", "2"),
        ("\\boxed{3} but #### 4", "4"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("no marker here: 12", None),
    ],
)
def test_extract_answer_takes_the_last_marker(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("completion", "reference", "correct"),
    [
        ("#### 1,000", "1000", True),
        ("#### $1000", "1000", True),
        ("#### 1000.0", "1000", True),
        ("#### 1000.", "1000", True),
        ("#### 999.99", "1000", False),
        ("#### -4", "-4", True),
        ("#### 4", "-4", False),
        ("#### 3/4", "0.75", True),
        ("#### 7 apples", "7", False),
        ("\\boxed{12}", "12", True),
        ("12", "12", False),
        ("####", "0", False),
    ],
)
def test_is_correct_is_exact_numeric_match(completion, reference, correct):
    assert is_correct(completion, reference) is correct


def test_parse_number_rejects_non_numbers():
    assert parse_number("12") == Fraction(12)
    assert parse_number("-0.5") == Fraction(-1, 2)
    for bad in ("", "abc", "1e3", "1-2", None):
        assert parse_number(bad) is None


@given(st.lists(st.integers(0, 99), min_size=2, max_size=6), st.lists(st.sampled_from("+-"), min_size=5, max_size=5))
def test_worked_solutions_reach_the_true_value_in_every_style(terms, ops):
    expression = " ".join([str(terms[0])] + [f"{op} {t}" for op, t in zip(ops, terms[1:], strict=False)])
    want = eval(expression)
    for style in range(3):
        solution, answer = chain_solution(expression, style)
        assert int(answer) == want
        assert is_correct(solution, str(want))


@given(
    st.lists(st.integers(0, 9), min_size=2, max_size=5),
    st.lists(st.sampled_from("+-"), min_size=4, max_size=4),
    st.integers(0, 2**32),
)
def test_slipped_steps_are_always_corrected(terms, ops, seed):
    """Every slip is a wrong value followed by ``, no,`` and the right one, so the final answer and
    each step's last word are still the true running values."""
    expression = " ".join([str(terms[0])] + [f"{op} {t}" for op, t in zip(ops, terms[1:], strict=False)])
    for style in range(3):
        solution, answer = chain_solution(expression, style, slips=1.0, rng=random.Random(seed))
        assert int(answer) == eval(expression)
        pairs = re.findall(r"(-?\d+), no, (-?\d+)", solution)
        assert len(pairs) == len(terms) - 1
        value = terms[0]
        for (wrong, right), op, b in zip(pairs, ops, terms[1:], strict=False):
            truth = value + b if op == "+" else value - b
            assert int(right) == truth
            assert int(wrong) in near_misses(value, op, b) and int(wrong) != truth
            value = truth


def test_slips_need_an_rng():
    with pytest.raises(ValueError, match="rng"):
        chain_solution("1 + 2", 0, slips=0.5)


def test_splits_are_disjoint_and_sized():
    splits = make_splits(
        "chain_sum",
        {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1, "styles": 3},
        {"train": 300, "holdout": 20, "distill": 40, "test": 30},
        seed=0,
    )
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "holdout": 20, "distill": 40, "test": 30}
    seen = [p["question"] for rows in splits.values() for p in rows]
    assert len(seen) == len(set(seen))
    assert all(is_correct(p["solution"], p["answer"]) for rows in splits.values() for p in rows)


def test_trace_stats_count_what_the_generator_wrote():
    rng = random.Random(0)
    rows = []
    for style, slips in ((0, 1.0), (1, 0.0), (2, 1.0), (2, 0.0)):
        solution, _ = chain_solution("2 + 9 - 3", style, slips, rng)
        rows.append({"prompt": "2 + 9 - 3 =\n", "completion": solution})
    stats = chain_trace_stats(rows)
    assert stats["style_mix"] == {"=": 0.25, "is": 0.25, "Start at": 0.5}
    assert stats["slips_per_step"] == 0.5  # 4 slipped steps out of 8
    assert style_of("no steps at all\n#### 3") == "?"


def test_trace_stats_tell_near_from_far_slips():
    rows = [{"prompt": "2 + 9 - 3 =\n", "completion": "2 + 9 = maybe -7, no, 11\n11 - 3 = maybe 7, no, 8\n#### 8"}]
    assert chain_trace_stats(rows)["far_slip_share"] == 0.5
