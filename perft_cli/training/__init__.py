"""The pieces of ``perft train`` (perft_cli/train.py reads top to bottom and calls these).

- ``setup``: run directory checks, the Accelerator, aux-loss coefficients, AdamW and the LR schedule (``Run``).
- ``step``: one optimizer step: micro-batches, the token-normalised loss, backward, clipping, the update; eval loss.
- ``state``: the data position, checkpoints of the full training state, and exact resume.
- ``resume``: the optimizer, scheduler and RNG states <-> safetensors + JSON files; can this checkpoint resume?
- ``progress``: what a run shows and records (progress bar, metrics.jsonl, trackers, the summary).
- ``collapse``: the PERFT-R routing-collapse watch.
"""
