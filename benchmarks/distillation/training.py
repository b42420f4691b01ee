"""Supervised fine-tuning on (prompt, completion) token sequences, loss on the completion only.

One loop serves every model of the evaluation: teacher and proxy trained from scratch on worked
solutions, the student's pre-training, and the attack itself (the student fine-tuned on teacher
traces) — fully for small models, with LoRA adapters (peft) for large ones, as the paper does.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from antidistill.proxy_worker.tools.traces import TokenizedTrace, tokenize_trace
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("antidistill.eval")


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, gt=0, description="optimizer steps (or give epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the examples (or give steps)")
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of steps with a linear warm-up")
    weight_decay: float = 0.0
    method: Literal["full", "lora"] = "full"
    lora_r: int = 16
    lora_alpha: int = 16

    def total_steps(self, examples: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.epochs is None:
            raise ValueError("give steps or epochs")
        return max(1, math.ceil(self.epochs * examples / self.batch_size))


def tokenized_examples(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]) -> list[TokenizedTrace]:
    """Training sequences: prompt, completion, EOS (the loss covers the completion and EOS)."""
    return [
        tokenize_trace(tokenizer, {"prompt": p, "completion": c}) for p, c in zip(prompts, completions, strict=True)
    ]


def collate(batch: Sequence[TokenizedTrace], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that are -100 on prompt and padding."""
    width = max(len(t.ids) for t in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, t in enumerate(batch):
        ids[i, : len(t.ids)] = torch.tensor(t.ids)
        mask[i, : len(t.ids)] = 1
        labels[i, t.prompt_len : len(t.ids)] = torch.tensor(t.ids[t.prompt_len :])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def with_lora(model: torch.nn.Module, spec: TrainSpec) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, config)


@torch.no_grad()
def completion_nll(
    model: torch.nn.Module, examples: Sequence[TokenizedTrace], pad_id: int, batch_size: int = 32
) -> float:
    """Mean NLL per completion token (token-weighted) of ``examples`` under ``model``; the model's
    train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        inputs = {k: v.to(model.device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        labels = inputs["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, reduction="sum")
        total += float(nll)
        tokens += int((labels != -100).sum())
    model.train(was_training)
    return total / max(tokens, 1)


Monitor = Callable[[torch.nn.Module], float]


def fine_tune(
    model: torch.nn.Module,
    examples: Sequence[TokenizedTrace],
    spec: TrainSpec,
    pad_id: int,
    seed: int,
    label: str = "",
    monitor: Monitor | None = None,
    checkpoints: int = 5,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train in place (LoRA: merged back afterwards) and return the model and a summary. With
    ``monitor`` (e.g. the NLL of held-out traces), the summary has ``curve``: at step 0 and at
    ``checkpoints`` evenly spaced steps, the mean training loss since the previous point and the
    monitor's value — the paper's training-vs-held-out loss check."""
    if not examples:
        raise ValueError(f"{label}: no training examples")
    if spec.method == "lora":
        model = with_lora(model, spec)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    steps = spec.total_steps(len(examples))
    warm = max(1, int(spec.warmup * steps))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    start = time.time()
    marks = {max(1, round(steps * k / checkpoints)) for k in range(1, checkpoints + 1)} if monitor else set()
    curve: list[dict[str, float | None]] = (
        [{"step": 0, "train_loss": None, "heldout": monitor(model)}] if monitor else []
    )
    for _ in range(steps):
        if len(order) < spec.batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = [examples[i] for i in order[: spec.batch_size]]
        del order[: spec.batch_size]
        inputs = {k: v.to(model.device) for k, v in collate(batch, pad_id).items()}
        loss = model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) in marks:
            recent = losses[int(curve[-1]["step"]) :]
            curve.append({"step": len(losses), "train_loss": sum(recent) / len(recent), "heldout": monitor(model)})
        if (len(losses) % max(1, steps // 5) == 0) or len(losses) == steps:
            log.info("%s: step %d/%d, loss %.4f (%.0f s)", label, len(losses), steps, losses[-1], time.time() - start)
    if spec.method == "lora":
        model = model.merge_and_unload()
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    summary: dict[str, Any] = {"steps": steps, "final_loss": sum(tail) / len(tail), "seconds": time.time() - start}
    if monitor:
        summary["curve"] = curve
    return model, summary
