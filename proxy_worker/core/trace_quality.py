"""What protection does to the text a user reads: the measures an operator weighs against protection.

Antidistillation keeps the final answer when λ is moderate, but a trace can become "technically
correct but weirdly haunted". Three measures over a set of completions say how much:

- **teacher NLL**: the unprotected teacher's mean negative log-likelihood per emitted token (how
  unnatural the text is to the model that wrote it; λ = 0 sampling sets the baseline);
- **degenerate rate**: the share of completions that loop (at least half of their 4-grams repeat an
  earlier one) or, where an answer is expected, give none;
- **mean length** in tokens.

Pure functions over token ids and log-probabilities; the offline engine (runtime/offline.py) supplies
them, the evaluation and ``antidistill tune`` report them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

REPEAT_NGRAM = 4
REPEAT_SHARE = 0.5  # a completion at least this repetitive is degenerate


def repetition_share(ids: Sequence[int], n: int = REPEAT_NGRAM) -> float:
    """Share of the n-grams of ``ids`` that repeat an earlier one (0: none; → 1: one loop)."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def is_degenerate(ids: Sequence[int], answered: bool | None = None) -> bool:
    """A looping completion, or one with no answer where one is expected (``answered`` False)."""
    return repetition_share(ids) >= REPEAT_SHARE or answered is False


@dataclass(frozen=True)
class TraceQuality:
    completions: int
    teacher_nll: float  # mean over all emitted tokens (token-weighted)
    degenerate_rate: float
    mean_tokens: float

    def as_dict(self) -> dict[str, float | int]:
        return {
            "completions": self.completions,
            "teacher_nll": round(self.teacher_nll, 6),
            "degenerate_rate": round(self.degenerate_rate, 6),
            "mean_tokens": round(self.mean_tokens, 3),
        }


def trace_quality(
    token_ids: Sequence[Sequence[int]],
    teacher_logprobs: Sequence[Sequence[float]],
    answered: Sequence[bool | None] | None = None,
) -> TraceQuality:
    """The measures over completions (``token_ids``), given the teacher's log-probability of each
    of their tokens; ``answered`` per completion where answers are expected (None: not checked)."""
    if len(token_ids) != len(teacher_logprobs) or not token_ids:
        raise ValueError(f"need one score list per completion, got {len(token_ids)} and {len(teacher_logprobs)}")
    answered = answered if answered is not None else [None] * len(token_ids)
    tokens = sum(len(ids) for ids in token_ids)
    nll = -sum(sum(scores) for scores in teacher_logprobs) / max(tokens, 1)
    degenerate = sum(is_degenerate(ids, a) for ids, a in zip(token_ids, answered, strict=True))
    return TraceQuality(len(token_ids), nll, degenerate / len(token_ids), tokens / len(token_ids))
