"""`perft demo`: the embedded demo in one process, on the shipped tiny MoE, with every file scripts/demo.sh made."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from perft_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "demo.yaml"
# A few steps and examples: the whole path (train, both evals, routing, the table) in seconds, not the demo's minutes.
SMALL = ["--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.save_every=2", "--limit", "3"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    result = CliRunner().invoke(app, ["demo", str(RECIPE), "--output-dir", str(run), *SMALL])
    return run, result


def test_demo_writes_every_file_of_the_four_commands(demo_run):
    run, result = demo_run
    assert result.exit_code == 0, result.output
    for rel in (
        "recipe.yaml",
        "metrics.jsonl",
        "summary.json",
        "best.json",
        "eval/before.json",
        "eval/before.examples.jsonl",
        "eval/after.json",
        "eval/after.examples.jsonl",
        "routing.json",
        "routing.html",
    ):
        assert (run / rel).is_file(), rel
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 4
    before, after = (json.loads((run / "eval" / f"{n}.json").read_text()) for n in ("before", "after"))
    assert before["adapted"] is False and after["adapted"] is True
    assert set(before["tasks"]) == set(after["tasks"]) == {"demo_choice", "demo_math"}
    assert all(t["examples"] == 3 for t in [*before["tasks"].values(), *after["tasks"].values()])
    assert json.loads((run / "routing.json").read_text())["examples"] == 3
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "routing" for e in events)  # inspect-routing logged into the run, as on its own


def test_demo_prints_the_before_after_table_from_the_eval_files(demo_run):
    run, result = demo_run
    before, after = (json.loads((run / "eval" / f"{n}.json").read_text())["tasks"] for n in ("before", "after"))
    assert re.search(r"^task\s+before\s+after$", result.stdout, re.M)
    for task in ("demo_choice", "demo_math"):
        row = f"{task:<14}{before[task]['accuracy']:>9.1%}{after[task]['accuracy']:>9.1%}"
        assert row in result.stdout.splitlines()
    assert f"results in {run}/" in result.stdout


def test_demo_refuses_an_unknown_recipe_name_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["demo", "nosuch", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no shipped recipe 'nosuch'" in lines[0] and "demo" in lines[0]
    assert not (tmp_path / "run").exists()


def test_demo_without_eval_tasks_fails_before_training(tmp_path):
    result = CliRunner().invoke(
        app, ["demo", str(RECIPE), "--set", "eval.tasks=[]", "--output-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 1
    assert "has no eval.tasks" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
