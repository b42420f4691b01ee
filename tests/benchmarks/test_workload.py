"""The benchmark workloads: the mixed stream's shape, and what the static-batch baseline is credited with."""

from __future__ import annotations

import torch
from antidistill.benchmarks.official_style import useful_tokens
from antidistill.benchmarks.workload import MIXED_BUDGETS, mixed_requests


def test_mixed_requests_vary_prompt_and_output_length_reproducibly():
    prompts, budgets = mixed_requests(40)
    assert (prompts, budgets) == mixed_requests(40)
    assert len(prompts) == len(budgets) == 40
    assert all(MIXED_BUDGETS[0] <= b <= MIXED_BUDGETS[1] for b in budgets)
    assert max(budgets) >= 4 * min(budgets)
    lengths = [len(p) for p in prompts]
    assert max(lengths) >= 3 * min(lengths)  # zero to three worked examples before the question


def test_a_static_batch_is_credited_only_with_the_tokens_each_request_asked_for():
    """Through the first EOS (counted, as a server counts it) and within the row's own budget; the
    padding a finished row keeps computing while its batch runs on is not output."""
    eos = 2
    new = torch.tensor([[5, eos, 0, 0, 0], [5, 6, 7, 8, 9], [5, 6, 7, eos, 0]])
    assert useful_tokens(new, [5, 3, 5], eos) == 2 + 3 + 4
