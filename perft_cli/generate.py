"""``perft generate``: try a trained run on a prompt of your own, without writing Python.

The prompt is wrapped in the paper's evaluation template (``prompts.eval_prompt``, what ``perft eval`` sends) unless
``--raw``, and decoded as the protocol decodes (deterministic beam search, ``eval.num_beams`` of the run's recipe).
The answer is the text after the last "### Response:". ``--base`` also answers with the frozen model (the same
loaded weights, the adapters detached), so the two can be compared side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perft_cli.errors import PerftError

DEFAULT_MAX_NEW_TOKENS = 128


def run_generate(
    ckpt: str | Path,
    prompt: str,
    *,
    input_text: str = "",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    base: bool = False,
    raw: bool = False,
) -> dict[str, Any]:
    """Answer ``prompt`` with the adapted model (and, with ``base``, the frozen one); print and return the answers."""
    from perft_cli.checkpoint import check_ckpt_arg, load_checkpoint_recipe, resolve_checkpoint

    if not prompt.strip():
        raise PerftError("--prompt is empty; give the question or instruction to answer, e.g. --prompt 'Is ice cold?'")
    check_ckpt_arg(ckpt, "generate")
    path = resolve_checkpoint(ckpt)
    recipe = load_checkpoint_recipe(path)
    # torch and transformers from here on: the arguments are known to be right.
    from perft_cli.adapters import detach_adapter
    from perft_cli.evaluation.generation import generate_responses
    from perft_cli.modeling import load_trained
    from perft_cli.prompts import eval_prompt

    text = prompt if raw else eval_prompt(prompt, input_text)
    model, tokenizer, recipe, _, attached = load_trained(path, recipe=recipe)
    settings = dict(batch_size=1, num_beams=recipe.eval.num_beams, max_new_tokens=max_new_tokens)
    answers = {"adapted": generate_responses(model, tokenizer, [text], **settings)[0]}
    if base:
        detach_adapter(model, attached.variant)  # the frozen model: the same weights without the adapters
        answers["base"] = generate_responses(model, tokenizer, [text], **settings)[0]
    return {"checkpoint": str(path), "prompt": text, "template": None if raw else "llm-adapters-eval", **answers}


def print_answers(result: dict[str, Any]) -> None:
    """The adapted answer alone on stdout; with the base answer, both labelled."""
    import sys

    if "base" not in result:
        sys.stdout.write(result["adapted"] + "\n")
        return
    sys.stdout.write(f"adapted: {result['adapted']}\nbase:    {result['base']}\n")
