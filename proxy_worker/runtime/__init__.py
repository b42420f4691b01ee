"""The processor inside vLLM: settings and per-request arguments, the rows of a teacher batch
(vLLM's add/remove/move/swap bookkeeping), the bounded proxy KV cache, one proxy step for a batch,
protection of a batch (λ·Δ added, or withheld when Δ cannot be had), capacity coupling with the
teacher's scheduler, the failure ledger the gateway reads, worker metrics, and the thin V1/V2
adapters vLLM loads by import path (``PROCESSOR_PATH`` in ``runtime.settings``)."""
