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
from collections.abc import Sequence
from typing import Literal

import torch
from antidistill.proxy_worker.tools.traces import TokenizedTrace
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


def fine_tune(
    model: torch.nn.Module, examples: Sequence[TokenizedTrace], spec: TrainSpec, pad_id: int, seed: int, label: str = ""
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train in place (LoRA: merged back afterwards) and return the model and a summary."""
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
        if (len(losses) % max(1, steps // 5) == 0) or len(losses) == steps:
            log.info("%s: step %d/%d, loss %.4f (%.0f s)", label, len(losses), steps, losses[-1], time.time() - start)
    if spec.method == "lora":
        model = model.merge_and_unload()
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return model, {"steps": steps, "final_loss": sum(tail) / len(tail), "seconds": time.time() - start}
