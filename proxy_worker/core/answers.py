"""Answer checking: the final number of a solution, from ``#### N`` or ``\\boxed{N}``, matched exactly.

The last marker wins (a model may restate an earlier guess); numbers are compared as exact
rationals after removing thousands separators, currency signs and a trailing period, so ``1,000``,
``$1000`` and ``1000.0`` all equal ``1000`` but ``999.99`` does not.
"""

from __future__ import annotations

import re
from fractions import Fraction

_HASH = re.compile(r"####\s*([^\n]*)")
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")


def extract_answer(text: str) -> str | None:
    """The text after the LAST ``####`` or inside the last ``\\boxed{}``, whichever comes later."""
    candidates = [(m.start(), m.group(1)) for m in _HASH.finditer(text)]
    candidates += [(m.start(), m.group(1)) for m in _BOXED.finditer(text)]
    if not candidates:
        return None
    return max(candidates)[1].strip()


def parse_number(text: str | None) -> Fraction | None:
    """An exact rational, or None when ``text`` is not a single number."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if cleaned.startswith("\\$"):
        cleaned = cleaned[2:]
    if not _NUMBER.match(cleaned):
        return None
    return Fraction(cleaned)


def is_correct(completion: str, reference: str) -> bool:
    """True when the completion's final answer equals ``reference`` numerically."""
    got = parse_number(extract_answer(completion))
    want = parse_number(reference)
    return got is not None and want is not None and got == want
