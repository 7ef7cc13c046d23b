"""The pieces of ``perft train`` (perft_cli/train.py reads top to bottom and calls these).

- ``setup``: run directory checks, the Accelerator, aux-loss coefficients, AdamW and the LR schedule (``Run``).
- ``step``: one optimizer step: micro-batches, the token-normalised loss, backward, clipping, the update; eval loss.
- ``state``: the data position, checkpoints of the full training state, and exact resume.
"""
