"""The gateway and the ``antidistill`` command: the OpenAI-compatible server process in front of
vLLM's engine. Requests pass one middleware (``middleware``) that authenticates the key
(``credentials``), parses the body once as vLLM will (``body``, ``request``), decides the tier's
policy (``tiers``, ``policy``, ``admission``, ``limits``), guards against unprotected output
(``guard``) and accounts for what was served (``accounting``, ``metrics``). ``cli`` dispatches the
sub-commands; ``serve`` starts vLLM with the processor."""
