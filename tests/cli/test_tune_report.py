"""`antidistill tune`'s pure parts: the recommendation (the largest strength every smaller one of which is
within tolerance) and the prompts file."""

from __future__ import annotations

import copy
import json

import pytest
from antidistill.server.tune.inputs import TuneError, read_prompts
from antidistill.server.tune.report import Tolerance, recommend


def point(strength, accuracy, nll, profile="math"):
    return {"profile": profile, "strength": strength, "accuracy": accuracy, "teacher_nll": nll, "degenerate_rate": 0}


def test_recommendation_stops_at_the_first_strength_outside_the_tolerance():
    points = [point(0, 0.80, 1.00), point(0.5, 0.80, 1.03), point(1, 0.78, 1.10), point(2, 0.80, 1.04)]
    accuracy = Tolerance("acc", "accuracy", 0.01, False, "lower")
    nll = Tolerance("nll", "teacher_nll", 0.05, True, "either")
    by = {r["tolerance"]: r["max_strength"] for r in recommend(points, (accuracy, nll))}
    assert by == {"acc": 0.5, "nll": 0.5}, "strength 2 recovers, but 1 broke the tolerance first"


def test_nll_tolerance_counts_a_fall_as_a_departure():
    """A looping completion is cheap to predict: its NLL falls; that is not a sign of good text."""
    nll = Tolerance("nll", "teacher_nll", 0.05, True, "either")
    points = [point(0, 0, 0.65), point(0.25, 0, 0.64), point(1, 0, 0.50)]
    assert recommend(points, (nll,))[0]["max_strength"] == 0.25


def test_recommendation_is_per_profile_and_zero_when_nothing_holds():
    points = [point(0, 0.8, 1.0, "a"), point(1, 0.5, 1.0, "a"), point(0, 0.8, 1.0, "b"), point(1, 0.8, 1.0, "b")]
    accuracy = Tolerance("acc", "accuracy", 0.01, False, "lower")
    assert recommend(points, (accuracy,)) == [
        {"profile": "a", "tolerance": "acc", "max_strength": 0.0},
        {"profile": "b", "tolerance": "acc", "max_strength": 1.0},
    ]


def test_prompts_file_renders_chat_like_the_chat_endpoint_and_names_bad_lines(tmp_path, tokenizer):
    """``messages`` go through the chat template as text, then tokens without added specials (what
    vLLM's chat endpoint does); ``prompt`` is tokenized as a completion prompt; a bad line is named."""
    tokenizer = copy.deepcopy(tokenizer)  # the session's tokenizer keeps its own template
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Alice has 3 apples"}], "answer": "3"})
        + "\n"
        + json.dumps({"prompt": "The sum of 12"})
        + "\n"
    )
    chat, plain = read_prompts(path, tokenizer)
    rendered = "<user>Alice has 3 apples\n<assistant>"
    assert chat.ids == tokenizer(rendered, add_special_tokens=False)["input_ids"] and chat.answer == "3"
    assert plain.ids == tokenizer("The sum of 12")["input_ids"] and plain.answer is None
    path.write_text('{"prompt": "x"}\n{"neither": 1}\n')
    with pytest.raises(TuneError, match=r"prompts.jsonl:2: expected an object with either 'messages' or 'prompt'"):
        read_prompts(path, tokenizer)
