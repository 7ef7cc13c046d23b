"""The pieces of ``perft merge`` (perft_cli/merge.py runs the command and calls these).

- ``fold``: the LoRA baseline folded into the frozen weights, checked against the exact float32 sum.
- ``verification``: fixed sample prompts; the written output's logits against the unmerged model's.
- ``card``: the README.md model card written into the output and the terminal summary.
"""
