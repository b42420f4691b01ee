"""The antidistillation processor: everything that runs next to the teacher inside vLLM's worker.

Three layers, dependencies pointing down: ``tools`` (offline: traces → gradient, ε calibration) and
``runtime`` (inside vLLM: row bookkeeping, the proxy KV cache, the step engine, protection of a
batch, the adapters vLLM loads) both build on ``core`` (pure maths and file formats: the proxy's
config, weights and gradient file, the two-copy forward pass, Δ).
"""
