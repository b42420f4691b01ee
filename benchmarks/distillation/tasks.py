"""Procedural problems with worked solutions, split into disjoint sets.

Every problem is ``{"question", "solution", "answer"}``: the solution is what a teacher is trained
to write (worked steps ending ``#### N``) and the answer is checked by ``answers.is_correct``.

- ``chain_sum``: reasoning-gym's ``chain_sum`` expressions (``4 - 1 - 7 =``) with our own worked solution in
  one of ``styles`` equivalent phrasings, small enough for models trained from scratch on a CPU in minutes.
  With ``slips`` > 0 each step is, with that probability, first written with a hedged near-miss value
  and then corrected (``4 - 1 = maybe 5, no, 3``): the toy's version of a reasoning model's "hmm,
  maybe … wait, no". The hedge comes first, so a learner can tell a slip from a step it means.
- ``step_sums``: single steps ``a ± b`` (``a`` from ``lo`` to ``hi``), the facts chains are made of.
- ``gsm_symbolic``: reasoning-gym's GSM8K-derived templates; the solution is ``answer_cot``.
- ``jsonl``: a GSM8K-style file of ``{"question", "answer"}`` whose answer ends ``#### N``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from antidistill.proxy_worker.core.answers import extract_answer

Problem = dict[str, str]


STYLES = (
    ("{a} {op} {b} = {c}", "\n"),
    ("{a} {op} {b} is {c}.", " "),
    ("{word} {b} gives {c}.", " "),
)
WORDS = {"+": "Add", "-": "Minus"}


def near_misses(a: int, op: str, b: int) -> list[int]:
    """Wrong values a learner plausibly writes for ``a op b``: off by one or two, or the other operation."""
    right = a + b if op == "+" else a - b
    flipped = a - b if op == "+" else a + b
    return sorted({right - 2, right - 1, right + 1, right + 2, flipped} - {right})


def chain_solution(
    expression: str, style: int = 0, slips: float = 0.0, rng: random.Random | None = None
) -> tuple[str, str]:
    """Worked steps for ``a ± b ± c …`` evaluated left to right, and the final value.

    Several equally correct styles exist so that a teacher trained on them has real choices to make
    between tokens that do not change the answer — the room antidistillation works in. Slips
    (``maybe``, a near-miss value, ``, no,`` and the right one, with probability ``slips`` per step,
    drawn from ``rng``) add such choices at every step: whether to slip at all, and which wrong value.
    """
    if slips and rng is None:
        raise ValueError("slips need an rng")
    template, sep = STYLES[style]
    tokens = expression.split()
    value = int(tokens[0])
    steps = [f"Start at {value}."] if template.startswith("{word}") else []
    for op, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        new = value + int(operand) if op == "+" else value - int(operand)
        shown = str(new)
        if slips and rng.random() < slips:
            shown = f"maybe {rng.choice(near_misses(value, op, int(operand)))}, no, {new}"
        steps.append(template.format(a=value, op=op, b=operand, c=shown, word=WORDS[op]))
        value = new
    return sep.join(steps) + f"\n#### {value}", str(value)


def _chain_sum(count: int, seed: int, params: dict[str, Any]) -> Iterator[Problem]:
    import reasoning_gym

    params = dict(params)
    styles = params.pop("styles", 1)
    slips = params.pop("slips", 0.0)
    rng = random.Random(seed)
    for item in reasoning_gym.create_dataset("chain_sum", size=count, seed=seed, **params):
        expression = item["metadata"]["expression"]
        solution, answer = chain_solution(expression, rng.randrange(styles), slips, rng)
        if answer != str(item["answer"]):
            raise AssertionError(f"worked solution disagrees with reasoning-gym on {expression!r}")
        yield {"question": f"{expression} =", "solution": solution, "answer": answer}


def _step_sums(count: int, seed: int, params: dict[str, Any]) -> Iterator[Problem]:
    """Single steps ``a ± b`` with ``a`` in [lo, hi] (negative too) and one-digit ``b``: the facts a
    chain is made of, without the chaining — a student's prior knowledge."""
    rng = random.Random(seed)
    styles = params.get("styles", 1)
    for _ in range(count):
        a, op, b = rng.randint(params["lo"], params["hi"]), rng.choice("+-"), rng.randint(0, 9)
        expression = f"{a} {op} {b}"
        solution, answer = chain_solution(expression, rng.randrange(styles), params.get("slips", 0.0), rng)
        yield {"question": f"{expression} =", "solution": solution, "answer": answer}


def _gsm_symbolic(count: int, seed: int, params: dict[str, Any]) -> Iterator[Problem]:
    import reasoning_gym

    for item in reasoning_gym.create_dataset("gsm_symbolic", size=count, seed=seed, **params):
        yield {"question": item["question"], "solution": item["metadata"]["answer_cot"], "answer": str(item["answer"])}


def _jsonl(count: int, seed: int, params: dict[str, Any]) -> Iterator[Problem]:
    lines = Path(params["path"]).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    start = seed % max(len(rows), 1)
    for row in (rows[start:] + rows[:start])[:count]:
        answer = extract_answer(row["answer"])
        if answer is None:
            raise ValueError(f"{params['path']}: answer without '#### N': {row['answer'][-80:]!r}")
        yield {"question": row["question"], "solution": row["answer"], "answer": answer}


GENERATORS = {"chain_sum": _chain_sum, "step_sums": _step_sums, "gsm_symbolic": _gsm_symbolic, "jsonl": _jsonl}


def make_splits(kind: str, params: dict[str, Any], sizes: dict[str, int], seed: int) -> dict[str, list[Problem]]:
    """Disjoint splits, drawn in the order given: a question never appears in two of them (later
    splits skip repeats), so list the small evaluation splits first and the training split last."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown task kind {kind!r} (known: {', '.join(GENERATORS)})")
    seen: set[str] = set()
    splits = {}
    for i, (name, size) in enumerate(sizes.items()):
        chosen: list[Problem] = []
        # reasoning-gym seeds item j of a dataset from seed + j: far-apart seeds keep splits apart;
        # draw up to 8× the size so that skipping repeats still leaves ``size`` problems
        for problem in GENERATORS[kind](size * 8 + 64, (seed * 16 + i) * 10_000_000, params):
            if len(chosen) == size:
                break
            if problem["question"] not in seen:
                seen.add(problem["question"])
                chosen.append(problem)
        if len(chosen) < size:
            raise ValueError(f"task {kind} yields only {len(chosen)} distinct problems for split {name!r}")
        splits[name] = chosen
    return splits


def prompt_of(problem: Problem) -> str:
    """The text a model is prompted with (the same for teacher, proxy and student)."""
    return problem["question"] + "\n"
