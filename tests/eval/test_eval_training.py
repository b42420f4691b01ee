"""The fine-tuning loop every model of the evaluation trains with: masking, full and LoRA training,
the completion NLL, and the training-vs-held-out curve."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from antidistill.benchmarks.distillation.models import Shape, scratch_model, train_tokenizer
from antidistill.benchmarks.distillation.training import TrainSpec, collate, completion_nll, fine_tune
from antidistill.proxy_worker.tools.traces import TokenizedTrace


def test_collate_masks_prompt_and_padding():
    batch = collate([TokenizedTrace([5, 6, 7, 8], 2), TokenizedTrace([9, 10, 11], 1)], pad_id=0)
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, 11, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fine_tuning_learns_a_completion(method):
    tok = train_tokenizer(["1 + 2 =\n3\n#### 3", "4 - 1 =\n3\n#### 3"] * 10, vocab_size=280)
    model = scratch_model(Shape(hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, intermediate=128), tok, 0)
    data = [TokenizedTrace(tok("1 + 2 =\n")["input_ids"] + tok("#### 3")["input_ids"] + [tok.eos_token_id], 5)] * 8
    before = model(**collate(data, tok.pad_token_id)).loss.item()
    q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    spec = TrainSpec(steps=40, batch_size=8, lr=1e-2, method=method, lora_r=8, lora_alpha=16)
    model, info = fine_tune(model, data, spec, tok.pad_token_id, seed=0)
    after = model(**collate(data, tok.pad_token_id)).loss.item()
    assert after < before - 1.0 and info["steps"] == 40
    assert type(model).__name__ == "LlamaForCausalLM"  # LoRA adapters merged back into a plain model
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_before)


def test_completion_nll_is_the_token_weighted_completion_loss():
    tok = train_tokenizer(["1 + 2 =\n3\n#### 3", "4 - 1 =\n3\n#### 3"] * 10, vocab_size=280)
    model = scratch_model(Shape(hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, intermediate=128), tok, 0)
    data = [TokenizedTrace(list(range(5, 14)), 3), TokenizedTrace(list(range(20, 25)), 2)]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for t in data:  # one trace at a time, no padding: the plain definition
            logp = torch.log_softmax(model(torch.tensor([t.ids])).logits[0], dim=-1)
            total -= sum(float(logp[j - 1, t.ids[j]]) for j in range(t.prompt_len, len(t.ids)))
            tokens += len(t.ids) - t.prompt_len
    assert completion_nll(model, data, tok.pad_token_id) == pytest.approx(total / tokens, rel=1e-5)


def test_fine_tuning_with_a_monitor_records_the_curve():
    """Step 0 and each checkpoint: the mean training loss since the last one and the monitor's value;
    training on the held-out data itself makes its NLL fall."""
    tok = train_tokenizer(["1 + 2 =\n3\n#### 3", "4 - 1 =\n3\n#### 3"] * 10, vocab_size=280)
    model = scratch_model(Shape(hidden=64, layers=1, heads=2, kv_heads=1, head_dim=32, intermediate=128), tok, 0)
    data = [TokenizedTrace(tok("1 + 2 =\n")["input_ids"] + tok("#### 3")["input_ids"] + [tok.eos_token_id], 5)] * 8
    monitor = partial(completion_nll, examples=data, pad_id=tok.pad_token_id)
    spec = TrainSpec(steps=20, batch_size=8, lr=1e-2)
    _, info = fine_tune(model, data, spec, tok.pad_token_id, 0, monitor=monitor, checkpoints=4)
    curve = info["curve"]
    assert [c["step"] for c in curve] == [0, 5, 10, 15, 20] and curve[0]["train_loss"] is None
    assert curve[-1]["heldout"] < curve[0]["heldout"] - 1.0 and all(c["train_loss"] > 0 for c in curve[1:])
