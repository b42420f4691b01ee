"""The ``antidistill`` command and the OpenAI-compatible server in front of vLLM's engine.

``gateway`` is the request path inside vLLM's API-server process; ``startup`` is ``antidistill serve``
up to the moment vLLM starts; ``embedded`` prepares the default SmolLM2 models; ``tune`` is the
operator's strength sweep. ``cli`` dispatches the sub-commands, ``tiers`` reads the tiers file they
all share, ``keygen`` makes keys for it."""
