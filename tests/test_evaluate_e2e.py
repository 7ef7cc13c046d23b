"""``perft eval`` end to end through the CLI on a tiny OLMoE with a hand-made PERFT-R checkpoint."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_checkpoint
from typer.testing import CliRunner

from perft_cli.cli import app
from perft_cli.prompts import eval_prompt

runner = CliRunner()
FAST = ["--set", "eval.max_new_tokens=8", "--batch-size", "4"]  # keeps each run to a few seconds on 2 CPU cores


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """A run directory with one checkpoint, and a data dir with a commonsense-style and an arithmetic task."""
    root = tmp_path_factory.mktemp("eval-e2e")
    model_dir = tiny_model_dir("olmoe")
    make_checkpoint(root / "run" / "checkpoints" / "step-00000001", model_dir)
    data = root / "data"
    choice = [
        {"instruction": f"Is item {i} red? Option1: yes Option2: no", "input": "", "answer": f"option{1 + i % 2}"}
        for i in range(6)
    ]
    math = [{"instruction": f"What is {i} + {i + 1}?", "input": "", "answer": str(2 * i + 1)} for i in range(6)]
    for name, records in (("demo_choice", choice), ("demo_math", math)):
        (data / name).mkdir(parents=True)
        (data / name / "test.json").write_text(json.dumps(records))
    return root, model_dir, data


def _invoke(args: list[str]):
    result = runner.invoke(app, ["eval", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _check_outputs(json_file: Path) -> dict:
    result = json.loads(json_file.read_text())
    examples = Path(result["examples_file"])
    assert examples == json_file.with_name(json_file.stem + ".examples.jsonl")
    rows = [json.loads(line) for line in examples.read_text().splitlines()]
    for name, t in result["tasks"].items():
        mine = [r for r in rows if r["task"] == name]
        assert [r["index"] for r in mine] == list(range(t["examples"]))
        assert t["accuracy"] == pytest.approx(sum(r["correct"] for r in mine) / len(mine))
        assert t["correct"] == sum(r["correct"] for r in mine)
    return result


def test_eval_checkpoint_writes_table_json_and_examples(setup, tmp_path):
    root, _, data = setup
    out = tmp_path / "res.json"
    r = _invoke(
        ["--ckpt", str(root / "run"), "--tasks", "demo_choice,demo_math", "--data-dir", str(data), "--json", str(out)]
        + FAST
    )
    assert r.exit_code == 0, r.output
    assert "demo_choice" in r.stdout and "demo_math" in r.stdout and "average commonsense" in r.stdout
    result = _check_outputs(out)
    assert result["protocol"] == "generation" and result["adapted"] is True
    assert result["checkpoint"].endswith("step-00000001")
    assert result["tasks"]["demo_choice"]["kind"] == "commonsense" and result["tasks"]["demo_math"]["kind"] == (
        "arithmetic"
    )
    assert result["tasks"]["demo_choice"]["examples"] == 6 and result["tasks"]["demo_choice"]["custom"] is True
    s = result["settings"]
    assert (s["num_beams"], s["do_sample"], s["early_stopping"], s["batch_size"]) == (4, False, False, 4)
    assert s["max_new_tokens"] == {"demo_choice": 8, "demo_math": 8}
    assert "option1|option2" in s["answer_rules"]["demo_choice"]
    assert result["averages"]["commonsense"] == result["tasks"]["demo_choice"]["accuracy"]
    assert result["recipe"]["adapter"]["variant"] == "perft-r"
    # Custom tasks and changed decoding are never labelled comparable with the paper, nor their averages.
    assert result["tasks"]["demo_choice"]["comparable"] is False and result["tasks"]["demo_choice"]["complete"]
    assert result["tasks"]["demo_choice"]["not_comparable_because"] == [
        "float32 backbone (the paper evaluated on bfloat16)",
        "custom task",
        "8 new tokens (protocol: 4)",
    ]
    data_file = Path(result["tasks"]["demo_choice"]["data_file"])
    assert result["tasks"]["demo_choice"]["data_sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert result["averages_not_comparable_because"]["commonsense"] == ["none of the paper's 8 commonsense tasks"]
    assert "8 new tokens (protocol: 256)" in result["tasks"]["demo_math"]["not_comparable_because"]
    assert result["averages_comparable"] == {"commonsense": False, "arithmetic": False}
    assert "not comparable with the PERFT paper's numbers" in result["protocol_note"]
    said = " ".join(r.stdout.split())  # the caption wraps at the console's width
    assert "not comparable with published" in said and "average commonsense: none of the paper's 8" in said
    rows = [json.loads(line) for line in Path(result["examples_file"]).read_text().splitlines()]
    first = rows[0]
    assert first["prompt"] == eval_prompt("Is item 0 red? Option1: yes Option2: no", "", commonsense=True)
    assert first["generated"].startswith("the correct answer is") and first["gold"] == "option1"
    assert set(first) == {"task", "index", "prompt", "generated", "prediction", "gold", "correct"}


def test_eval_default_json_in_run_dir_and_limit(setup):
    root, _, data = setup
    r = _invoke(["--ckpt", str(root / "run"), "--tasks", "demo_math", "--data-dir", str(data), "--limit", "2"] + FAST)
    assert r.exit_code == 0, r.output
    found = sorted((root / "run" / "eval").glob("step-00000001-adapted-*.json"))
    assert found, "expected RUN/eval/<checkpoint>-adapted-<time>.json"
    result = _check_outputs(found[-1])
    assert result["tasks"]["demo_math"]["examples"] == 2 and result["limit"] == 2
    assert result["averages"] == {"commonsense": None, "arithmetic": result["tasks"]["demo_math"]["accuracy"]}


def test_eval_base_from_recipe_without_checkpoint(setup, tmp_path):
    _, model_dir, data = setup
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(model_dir), "dtype": "float32"},
                "eval": {"tasks": ["demo_choice"], "data_dir": str(data), "max_new_tokens": 4, "limit": 3},
                "output_dir": str(tmp_path / "run"),
            }
        )
    )
    r = _invoke(["--base", "--recipe", str(recipe)])
    assert r.exit_code == 0, r.output
    (json_file,) = (tmp_path / "run" / "eval").glob("base-*.json")
    result = _check_outputs(json_file)
    assert result["adapted"] is False and result["checkpoint"] is None
    assert result["tasks"]["demo_choice"]["examples"] == 3 and result["settings"]["max_new_tokens"]["demo_choice"] == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", "mmlu"], "unknown task 'mmlu'; known tasks: boolq, piqa, social_i_qa"),
        (["--tasks", "boolq"], "git clone https://github.com/AGI-Edgerunners/LLM-Adapters"),
        (["--tasks", "broken"], "record 2: missing or non-text field 'answer'"),  # the second record
        (["--tasks", "demo_math", "--mode", "lm-eval"], "pip install 'perft-cli[lm-eval]'"),
        (["--tasks", "demo_math", "--mode", "fast"], "--mode 'fast'"),
    ],
)
def test_eval_user_errors_are_one_line(setup, tmp_path, monkeypatch, args, message):
    root, _, data = setup
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # lm-eval is not installed here; make sure of it anyway
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "test.json").write_text(
        json.dumps([{"instruction": "q", "answer": "1"}, {"instruction": 2}])
    )
    r = _invoke(["--ckpt", str(root / "run"), "--data-dir", str(tmp_path), *args])
    assert r.exit_code == 1
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_eval_needs_checkpoint_or_base_recipe():
    r = _invoke(["--tasks", "boolq"])
    assert r.exit_code == 1 and "pass --ckpt DIR" in r.stderr


def _no_model(monkeypatch):
    """Loading the model now fails the test: the error must come before the (slow) model load."""
    import perft_cli.modeling

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(perft_cli.modeling, "load_trained", refuse)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--json", "{tmp}/adir"], "--json '{tmp}/adir' is a folder; it names the file to write: choose another path"),
        (["--json", "{tmp}/afile.txt/res.json"], "--json '{tmp}/afile.txt/res.json' cannot be created: '{tmp}/afile"),
        (["--json", "{tmp}/out/r.json"], "the per-example file '{tmp}/out/r.examples.jsonl' is a folder"),
        (["--data-dir", "{tmp}/nodatadir"], "--data-dir '{tmp}/nodatadir' does not exist; pass the folder that holds"),
    ],
)
def test_eval_bad_output_path_or_data_dir_fails_before_loading(setup, tmp_path, monkeypatch, args, message):
    root, _, data = setup
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile.txt").write_text("hi")
    (tmp_path / "out" / "r.examples.jsonl").mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    _no_model(monkeypatch)
    r = _invoke(
        ["--ckpt", str(root / "run"), "--tasks", "demo_choice", "--data-dir", str(data)]
        + [a.format(tmp=tmp_path) for a in args]  # a second --data-dir replaces the first
    )
    assert r.exit_code == 1, r.output
    assert message.format(tmp=tmp_path) in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no orphan .examples.jsonl, no folder made


def test_eval_ctrl_c_leaves_nothing_and_says_so(setup, tmp_path, monkeypatch):
    """Ctrl-C in the second task: exit 130, one line, and neither the JSON nor the first task's examples exist."""
    from perft_cli import evaluate

    root, _, data = setup
    real = evaluate._with_progress
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "_with_progress", interrupted)
    out = tmp_path / "new" / "res.json"
    args = ["--ckpt", str(root / "run"), "--tasks", "demo_choice,demo_math", "--data-dir", str(data), "--limit", "2"]
    r = _invoke([*args, "--json", str(out), *FAST])
    assert r.exit_code == 130 and len(calls) == 2
    assert r.stderr.count("interrupted") == 1 and "Traceback" not in r.stderr
    assert f"nothing was written to {out} or {out.with_name('res.examples.jsonl')}" in r.stderr
    assert list(tmp_path.iterdir()) == []  # no results, no examples, no temporary file, not even the new folder


def test_eval_keeps_an_earlier_result_when_interrupted(setup, tmp_path, monkeypatch):
    from perft_cli import evaluate

    root, _, data = setup
    out = tmp_path / "res.json"
    args = ["--ckpt", str(root / "run"), "--tasks", "demo_math", "--data-dir", str(data), "--limit", "1"]
    assert _invoke([*args, "--json", str(out), *FAST]).exit_code == 0
    first = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert sorted(first) == ["res.examples.jsonl", "res.json"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "_with_progress", interrupted)
    assert _invoke([*args, "--json", str(out), *FAST]).exit_code == 130
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == first


def test_eval_ckpt_that_is_a_file_or_a_model_folder(setup, tmp_path, monkeypatch):
    _, model_dir, _ = setup
    _no_model(monkeypatch)
    (tmp_path / "afile.txt").write_text("hi")
    r = _invoke(["--ckpt", str(tmp_path / "afile.txt")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert "is a file; pass a run directory" in r.stderr and "has the run saved yet" not in r.stderr
    r = _invoke(["--ckpt", str(model_dir)])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "has the run saved yet" not in r.stderr
    assert "is a model folder" in r.stderr
    assert f"perft eval --base --recipe R.yaml --set model.name_or_path={model_dir}" in r.stderr
