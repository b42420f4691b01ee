"""The embedded default: the SmolLM2 teacher, its half-depth proxy and gradient, prepared on first use."""
