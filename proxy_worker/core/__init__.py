"""The proxy model and Δ, free of vLLM: a Hugging Face config read into ``ProxyConfig``, weights
and the gradient file read and checked, the two-copy (θ ± εg) forward pass with its index plan and
RoPE, and the pure functions that turn two log-softmaxes into Δ. Nothing here knows about requests,
batches or servers, so the same code serves the runtime, the offline tools and the tests."""
