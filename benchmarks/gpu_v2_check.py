"""End-to-end check of the EXPERIMENTAL V2-runner adapter — needs a CUDA GPU with vllm==0.32.0.

    python -m antidistill.benchmarks.gpu_v2_check

Builds the tiny teacher/proxy/gradients of the integration tests, starts vLLM with the V2 model
runner and ``AntidistillationLogitsProcessorV2``, and compares greedy outputs for a mixed-λ batch
with the HF reference sampler (run on the CPU). Exit code 0 only if every row matches token for
token, or parts from the reference only at a near-tie (top-2 margin under 2 × ``LOGPROB_NOISE``,
the bound the CPU preemption test uses: GPU kernels round differently from the CPU reference). Not run in
CI (no GPU there); it has not been run yet — see docs/benchmarks.md. The tiny models and the
reference come from ``antidistill.benchmarks.tiny``, the library home of the test set-up.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from antidistill.proxy_worker.runtime.settings import PROCESSOR_PATH_V2 as V2_PROCESSOR


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_v2_check: no CUDA device", file=sys.stderr)
        return 2
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    from antidistill.benchmarks.tiny.reference import ReferenceSampler, agrees_up_to_noise, first_divergence
    from antidistill.benchmarks.tiny.serving import EPSILONS, additional_config_json, build_models
    from vllm import LLM, SamplingParams

    models = build_models(Path(tempfile.mkdtemp()))
    os.environ["ANTIDISTILL_CONFIG"] = additional_config_json(models)
    llm = LLM(
        model=str(models.teacher),
        dtype="float32",
        max_model_len=256,
        logits_processors=[V2_PROCESSOR],
        additional_config={"antidistillation": models.settings()},
        seed=0,
    )
    prompts = [models.tokenizer(p)["input_ids"] for p in ("The sum of 12", "Alice has 3 apples", "x", "Each box")]
    lams = [0.0, 0.5, 5.0, 5.0]
    params = [
        SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, extra_args={"ad_lambda": lam}) for lam in lams
    ]
    outs = [list(r.outputs[0].token_ids) for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]
    theta, grad = models.theta_and_grad("math")
    ref = ReferenceSampler(models.teacher, models.proxy, theta, grad, EPSILONS["math"])
    failures = 0
    for ids, lam, out in zip(prompts, lams, outs, strict=True):
        expected, margins = ref.greedy(ids, lam, 64)
        step = first_divergence(expected, out)
        ok = agrees_up_to_noise(expected, margins, out)
        failures += not ok
        where = "match" if step is None else f"parted at step {step} (top-2 margin {margins[step]:.2e})"
        print(f"λ={lam:<4} prompt={len(ids):>2} tokens: {where}{'' if ok else ' — MISMATCH at a clear winner'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
