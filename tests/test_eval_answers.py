"""Answer extraction and checking for the distillation evaluation (pure functions)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.distillation.answers import extract_answer, is_correct, parse_number
from benchmarks.distillation.tasks import chain_solution, make_splits


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
