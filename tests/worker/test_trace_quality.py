"""Trace-quality measures: teacher NLL per emitted token, degenerate outputs, length."""

from __future__ import annotations

import math

import pytest
from antidistill.proxy_worker.core.trace_quality import is_degenerate, repetition_share, trace_quality


def test_repetition_share_separates_a_loop_from_prose():
    assert repetition_share(list(range(40))) == 0.0
    loop = [7, 8, 9, 10] * 10  # "12 + 30 = 32 … 12 + 30 = 32 …"
    assert repetition_share(loop) == pytest.approx(1 - 4 / 37)
    assert is_degenerate(loop) and not is_degenerate(list(range(40)))
    assert repetition_share([1, 2]) == 0.0, "too short to repeat a 4-gram"


def test_no_answer_is_degenerate_only_where_one_is_expected():
    prose = list(range(20))
    assert is_degenerate(prose, answered=False)
    assert not is_degenerate(prose, answered=True) and not is_degenerate(prose, answered=None)


def test_trace_quality_is_token_weighted():
    ids = [[1, 2, 3, 4], [5, 6]]
    logprobs = [[-1.0, -1.0, -1.0, -1.0], [-4.0, -4.0]]
    q = trace_quality(ids, logprobs, [True, False])
    assert q.teacher_nll == pytest.approx((4 * 1 + 2 * 4) / 6)
    assert (q.completions, q.degenerate_rate, q.mean_tokens) == (2, 0.5, 3.0)
    assert math.isclose(q.as_dict()["teacher_nll"], 2.0)
    with pytest.raises(ValueError, match="one score list per completion"):
        trace_quality(ids, logprobs[:1])
