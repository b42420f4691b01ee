"""Tiny models built on the spot (random-weight Llama/Qwen/Mistral teachers and proxies with a trained
toy tokenizer), their antidistillation set-up (proxy, gradients, tiers, `antidistill serve`
arguments), and an independent Hugging Face reference sampler to compare served tokens with. The
tests, the soak benchmark and the GPU check share them, so none of those depends on another."""
