"""The LLM-Adapters prompt templates, byte for byte (method.md, "Prompt templates"; pinned by tests).

The reference writes them as indented triple-quoted strings, hence the 16-space indents and the trailing spaces,
which differ between training and evaluation. Do not "clean them up": published numbers depend on these bytes.
"""

from __future__ import annotations

I = " " * 16  # noqa: E741 - the reference's indentation inside its triple-quoted templates

TRAIN_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
TRAIN_HEADER_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
COMMONSENSE_PREFIX = "the correct answer is"
RESPONSE_MARK = "### Response:"


def train_prompt(instruction: str, input: str = "", output: str = "") -> str:
    """The training text: prompt and response (LLM-Adapters ``generate_prompt``)."""
    if input:
        return (
            TRAIN_HEADER_INPUT + " \n\n"
            f"{I}### Instruction:\n{I}{instruction}\n{I}\n"
            f"{I}### Input:\n{I}{input}\n{I}\n"
            f"{I}### Response:\n{I}{output}"
        )
    return TRAIN_HEADER + f"  \n\n{I}### Instruction:\n{I}{instruction}\n{I}\n{I}### Response:\n{I}{output}"


def eval_prompt(instruction: str, input: str = "", commonsense: bool = False) -> str:
    """The evaluation prompt; commonsense prompts are pre-filled with "the correct answer is" (PERFT)."""
    if input:
        text = (
            TRAIN_HEADER_INPUT + "\n\n"
            f"{I}### Instruction:\n{I}{instruction}\n\n"
            f"{I}### Input:\n{I}{input}\n\n"
            f"{I}### Response:\n{I}"
        )
    else:
        text = TRAIN_HEADER + f" \n\n{I}### Instruction:\n{I}{instruction}\n\n{I}### Response:\n{I}"
    return text + (COMMONSENSE_PREFIX if commonsense else "")


def response_of(decoded: str) -> str:
    """The generated answer: the decoded text after the last "### Response:"."""
    return decoded.rsplit(RESPONSE_MARK, 1)[-1].strip() if RESPONSE_MARK in decoded else decoded.strip()
