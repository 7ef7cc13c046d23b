"""The pieces of ``perft eval`` (perft_cli/evaluate.py runs the command and calls these).

- ``tasks``: the task registry of method.md (names, aliases, label sets) and the protocol's answer extraction.
- ``testsets``: a task's test records: ``<data-dir>/<task>/test.json``, custom tasks, every record checked.
- ``hub_converters``: a task's hub dataset converted to LLM-Adapters records byte for byte, and cached.
- ``generation``: batched deterministic beam search, one prompt at a time's results.
- ``lm_eval_mode``: ``--mode lm-eval``, the loaded model handed to lm-evaluation-harness.
"""
