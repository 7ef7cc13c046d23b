"""The pieces of ``perft merge`` (perft_cli/merge.py runs the command and calls these).

- ``fold``: the LoRA baseline folded into the frozen weights, checked against the exact float32 sum.
- ``export``: the PERFT export folder (and the LoRA baseline as a peft adapter folder).
- ``remote_modeling``: the modeling file shipped inside a PERFT export (torch + transformers only; perft never
  imports it to load anything).
- ``isolated``: the export loaded by plain transformers in a child process where perft_cli cannot be imported.
- ``verification``: fixed sample prompts; the written output's logits against the unmerged model's.
- ``card``: the README.md model card written into the output and the terminal summary.
"""
