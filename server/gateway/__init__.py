"""The request path inside vLLM's API-server process: ASGI middleware that reads the key, parses the body
once, admits the request under its tier's λ and limits, guards the response and audits what was served."""
