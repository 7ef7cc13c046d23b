"""``perft generate``: a run answers a prompt of the user's own, with the paper's template unless --raw."""

from __future__ import annotations

import pytest
from conftest import make_checkpoint
from typer.testing import CliRunner

from perft_cli.cli import app


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_model_dir):
    return make_checkpoint(tmp_path_factory.mktemp("gen") / "ckpt", tiny_model_dir("olmoe"))


def test_generate_answers_with_the_adapted_and_the_frozen_model(ckpt):
    from perft_cli.evaluation.generation import generate_responses
    from perft_cli.generate import run_generate
    from perft_cli.modeling import load_trained
    from perft_cli.prompts import eval_prompt

    result = run_generate(ckpt, "Is ice cold?", max_new_tokens=6, base=True)
    assert result["prompt"] == eval_prompt("Is ice cold?")  # the paper's evaluation template
    model, tok, *_ = load_trained(ckpt)
    frozen, _, *_ = load_trained(ckpt, base=True)
    expected = dict(batch_size=1, num_beams=4, max_new_tokens=6)
    assert result["adapted"] == generate_responses(model, tok, [result["prompt"]], **expected)[0]
    assert result["base"] == generate_responses(frozen, tok, [result["prompt"]], **expected)[0]
    assert result["adapted"] != result["base"]  # the (non-trivial) adapter changes the answer


def test_cli_prints_the_answer_and_takes_raw_prompts(ckpt):
    runner = CliRunner()
    one = runner.invoke(app, ["generate", "--ckpt", str(ckpt), "--prompt", "Is ice cold?", "--max-new-tokens", "4"])
    assert one.exit_code == 0, one.output
    assert one.stdout.count("\n") == 1  # the answer alone, ready for a pipe
    both = runner.invoke(app, ["generate", "--ckpt", str(ckpt), "--prompt", "2+2=", "--raw", "--base"])
    assert both.exit_code == 0, both.output
    assert both.stdout.startswith("adapted: ") and "\nbase:    " in both.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "invalid value for '--max-new-tokens'"),
    ],
)
def test_bad_arguments_are_one_line(ckpt, args, message):
    result = CliRunner().invoke(app, ["generate", "--ckpt", str(ckpt), *args])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_missing_checkpoint_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["generate", "--ckpt", str(tmp_path / "nope"), "--prompt", "hi"])
    assert result.exit_code == 1 and "does not exist" in result.stderr
