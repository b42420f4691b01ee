"""What ``antidistill tune`` runs on: the prompts file, the gradient profiles with their Δ scales, the
strengths of an existing tiers file, and the embedded default's inputs (the formats: server/tune/sweep.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antidistill.proxy_worker.core.gradient_file import read_delta_scale
from antidistill.proxy_worker.core.strength import ADD_SCALE, ProfileScales, strength_of
from antidistill.server.startup.flags import parse_gradient
from antidistill.server.tiers import TiersError, load_tiers


class TuneError(ValueError):
    """Inputs the sweep cannot run on; printed as one line."""


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # what the report shows
    answer: str | None


@dataclass(frozen=True)
class Profile:
    name: str
    gradient: str
    scale: float


def read_prompts(path: Path, tokenizer: Any, limit: int | None = None) -> list[Prompt]:
    """The prompts file (its format: server/tune/sweep.py); TuneError names a bad line."""
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TuneError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
        if not isinstance(rec, dict) or ("messages" in rec) == ("prompt" in rec):
            raise TuneError(f"{path}:{n}: expected an object with either 'messages' or 'prompt'")
        answer = rec.get("answer")
        if "messages" in rec:
            # as vLLM's chat endpoint does: render the template to text, then tokenize without adding specials
            rendered = tokenizer.apply_chat_template(rec["messages"], add_generation_prompt=True, tokenize=False)
            ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            text = str(rec["messages"][-1].get("content", ""))
        else:
            ids, text = tokenizer(str(rec["prompt"]))["input_ids"], str(rec["prompt"])
        prompts.append(Prompt(list(ids), text, None if answer is None else str(answer)))
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise TuneError(f"{path}: no prompts")
    return prompts


def load_profiles(items: Sequence[str], proxy: str) -> list[Profile]:
    """``NAME=PATH`` (or a bare path: profile ``default``) with the Δ scale each file stores."""
    profiles = []
    for item in items:
        try:
            name, path = parse_gradient(item, bare_name="default")
        except ValueError as exc:
            raise TuneError(str(exc)) from None
        if not Path(path).is_file():
            raise TuneError(f"--gradient {path}: file not found")
        scale = read_delta_scale(path)
        if scale is None:
            fix = ADD_SCALE.format(proxy=proxy, gradient=path)
            raise TuneError(f"--gradient {path} stores no Δ scale, which strengths need: store it with `{fix}`")
        profiles.append(Profile(name, path, scale))
    return profiles


def tier_strengths(path: Path, profiles: Sequence[Profile]) -> list[dict[str, Any]]:
    """Each tier's default strength (and its profile) in a tiers file, read as the server reads it."""
    scales = ProfileScales(
        {p.name: p.scale for p in profiles}, profiles[0].name, {p.name: p.gradient for p in profiles}
    )
    try:
        table = load_tiers(path, scales)
    except TiersError as exc:
        raise TuneError(str(exc)) from None
    out = []
    for name, tier in table.spec.tiers.items():
        profile = scales.profile(tier.profile)
        if profile not in scales.scales:
            raise TuneError(f"{path}: tier {name} uses profile {profile!r}, not given with --gradient")
        out.append({"tier": name, "profile": profile, "strength": strength_of(tier.lambda_, scales.scales[profile])})
    return out


def embedded_inputs(args: argparse.Namespace) -> None:
    """Fill what the flags left open from the embedded default, prepared as ``make serve`` does."""
    from antidistill.server.embedded.setup import EMBEDDED_PROFILE, prepare, tune_prompts

    ready = prepare()
    args.model = args.model or str(ready.teacher)
    args.proxy = args.proxy or str(ready.proxy)
    args.gradient = args.gradient or [f"{EMBEDDED_PROFILE}={ready.gradient}"]
    args.prompts = args.prompts or tune_prompts(ready.cache / "tune-gsm_symbolic.jsonl")
    args.tiers = args.tiers or ready.tiers
