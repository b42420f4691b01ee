"""`antidistill serve` before vLLM starts: flags, pre-flight checks, the proxy KV plan, CPU settings."""
