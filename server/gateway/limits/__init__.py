"""Per-scope request, token and concurrency limits: the in-process state, the Redis state every replica
shares, and the Lua scripts that make each Redis decision atomic."""
