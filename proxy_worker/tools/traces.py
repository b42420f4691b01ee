"""Holdout traces: JSONL of ``{"prompt", "completion"}`` or chat ``{"messages": [...]}``, tokenized
into (token ids, number of prompt tokens) so losses can be computed on the completion only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TraceError(ValueError):
    """A traces file line that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class TokenizedTrace:
    ids: list[int]
    prompt_len: int

    @property
    def completion_tokens(self) -> int:
        return len(self.ids) - self.prompt_len


def read_traces(path: str | Path) -> list[dict[str, Any]]:
    """Parse and shape-check every line (blank lines are skipped)."""
    records = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: invalid JSON ({exc})") from exc
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            msgs = rec["messages"]
            if not msgs or msgs[-1].get("role") != "assistant":
                raise TraceError(f"{where}: 'messages' must end with an assistant message (the completion)")
        elif not (
            isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)
        ):
            raise TraceError(f"{where}: expected {{'prompt': str, 'completion': str}} or {{'messages': [...]}}")
        records.append(rec)
    if not records:
        raise TraceError(f"{path}: no traces")
    return records


def tokenize_trace(tokenizer: Any, rec: dict[str, Any], append_eos: bool = True) -> TokenizedTrace:
    """Token ids of prompt + completion and where the completion starts.

    Chat traces use the tokenizer's chat template: the prompt is the conversation up to the
    assistant turn (with the generation prompt), the completion is the rest of the rendered
    conversation (so it includes the end-of-turn token the teacher emitted). Plain traces append
    EOS to the completion when ``append_eos`` (the teacher stopped there).
    """
    if "messages" in rec:
        msgs = rec["messages"]
        prompt = _as_ids(tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True))
        full = _as_ids(tokenizer.apply_chat_template(msgs, tokenize=True))
        if full[: len(prompt)] != prompt:
            raise TraceError("chat template does not render the prompt as a prefix of the conversation")
        return TokenizedTrace(full, len(prompt))
    prompt = tokenizer(rec["prompt"])["input_ids"]
    completion = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"]
    if append_eos and tokenizer.eos_token_id is not None:
        completion = [*completion, tokenizer.eos_token_id]
    return TokenizedTrace(list(prompt) + list(completion), len(prompt))


def _as_ids(encoded: Any) -> list[int]:
    """apply_chat_template returns a list or a BatchEncoding depending on the transformers version."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)
