"""``perft validate``: recipe, model config, tokenizer, every record and the eval files checked, no weights loaded."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_recipe
from typer.testing import CliRunner

from perft_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_recipe_validates_and_says_what_was_checked(monkeypatch):
    import perft_cli.modeling

    def refuse(*args, **kwargs):
        raise AssertionError("validate loaded the weights")

    monkeypatch.setattr(perft_cli.modeling, "load_model", refuse)
    result = CliRunner().invoke(app, ["validate", str(ROOT / "recipes" / "demo.yaml")])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    for checked in ("ok: every check passed", "OLMoE, 4 MoE layers", "67,584 trainable", "1,600 records checked",
                    "demo_choice (100 records", "demo_math (100 records"):  # fmt: skip
        assert checked in out, (checked, out)


def test_a_broken_record_is_one_line_naming_it(tmp_path, tiny_model_dir):
    data = tmp_path / "data.json"
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    records[6] = {"instruction": "no output here"}
    data.write_text(json.dumps(records))
    raw = {"model": {"name_or_path": str(tiny_model_dir("olmoe"))}, "data": {"train": str(data), "val_size": 2}}
    result = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path, raw))])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert f"{data}: record 7: field 'output' is missing" in result.stderr


def test_too_few_records_for_a_batch_and_an_unknown_task_are_found(tmp_path, tiny_model_dir):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]))
    raw = {
        "model": {"name_or_path": str(tiny_model_dir("olmoe"))},
        "data": {"train": str(data), "val_size": 2},
        "train": {"batch_size": 8, "micro_batch_size": 8},
    }
    few = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path, raw))])
    assert few.exit_code == 1 and "only 4 training examples, fewer than train.batch_size=8" in few.stderr
    raw["train"] = {"batch_size": 2, "micro_batch_size": 2}
    raw["eval"] = {"tasks": ["no_such_task"]}
    task = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path, raw))])
    assert task.exit_code == 1 and "unknown task 'no_such_task'" in task.stderr
