"""``perft eval --mode lm-eval`` for real: lm-evaluation-harness on a tiny OLMoE, local task YAMLs, no hub.

Skipped when lm-eval is not installed (``pip install 'perft-cli[lm-eval]'``; the ``dev`` extra has it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, make_checkpoint
from typer.testing import CliRunner

from perft_cli.cli import app
from perft_cli.prompts import eval_prompt

pytest.importorskip("lm_eval", reason="lm-eval (module lm_eval) is not installed: pip install 'perft-cli[lm-eval]'")

runner = CliRunner()
TASK = "perft_tiny_choice"
RECORDS = [
    {"question": f"Is item {i} red?", "choices": ["yes", "no", "maybe"], "answer": ["yes", "no", "maybe"][i % 3]}
    for i in range(6)
]
PROMPT = "Question: {{question}}\nAnswer:"


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """A run with a non-trivial PERFT-R checkpoint, and a folder with one local multiple-choice lm-eval task."""
    root = tmp_path_factory.mktemp("lm-eval")
    model_dir = tiny_model_dir("olmoe")
    make_checkpoint(root / "run" / "checkpoints" / "step-00000001", model_dir)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "data.json").write_text(json.dumps(RECORDS))
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "data.json")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": PROMPT,
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{choices.index(answer)}}",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }
    (tasks / f"{TASK}.yaml").write_text(yaml.safe_dump(task))
    return root, model_dir, tasks


def _invoke(args: list[str]):
    result = runner.invoke(app, ["eval", "--mode", "lm-eval", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _check(json_file: Path, examples: int) -> tuple[dict, list[dict]]:
    """The results JSON and its per-sample rows, checked against each other."""
    result = json.loads(json_file.read_text())
    assert result["protocol"] == "lm-eval"
    assert "NOT comparable" in result["protocol_note"] and "generation protocol" in result["protocol_note"]
    assert result["settings"]["lm_eval_version"] and result["settings"]["lm_eval_tasks"] == [TASK]
    t = result["tasks"][TASK]
    assert t["output_type"] == "multiple_choice" and t["num_fewshot"] == 0
    assert (t["examples"], t["total_examples"], t["complete"]) == (examples, len(RECORDS), examples == len(RECORDS))
    assert 0.0 <= t["accuracy"] <= 1.0 and 0.0 <= t["acc_norm"] <= 1.0 and t["acc_stderr"] >= 0.0
    assert t["metrics"]["acc"] == t["accuracy"] and t["metrics"]["acc_norm"] == t["acc_norm"]
    rows = [json.loads(line) for line in Path(result["examples_file"]).read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(examples)) and {r["task"] for r in rows} == {TASK}
    for r in rows:
        record = RECORDS[r["index"]]
        assert r["prompt"] == f"Question: {record['question']}\nAnswer:"
        assert r["continuations"] == [" " + c for c in record["choices"]]
        assert len(r["loglikelihoods"]) == 3 and all(ll < 0 for ll in r["loglikelihoods"])
        best = max(range(3), key=lambda i: r["loglikelihoods"][i])
        assert r["acc"] == float(best == record["choices"].index(record["answer"]))
    assert t["accuracy"] == pytest.approx(sum(r["acc"] for r in rows) / examples)
    assert t["acc_norm"] == pytest.approx(sum(r["acc_norm"] for r in rows) / examples)
    return result, rows


def test_lm_eval_scores_the_adapted_model_and_differs_from_base(setup, tmp_path):
    root, _, tasks = setup
    adapted_json, base_json = tmp_path / "adapted.json", tmp_path / "base.json"
    common = ["--ckpt", str(root / "run"), "--lm-eval-include", str(tasks), "--batch-size", "4"]
    r = _invoke([*common, "--tasks", TASK, "--limit", "4", "--json", str(adapted_json)])
    assert r.exit_code == 0, r.output
    assert "NOT comparable" in r.stdout and TASK in r.stdout and "4 *" in r.stdout  # the table; 4 of 6 examples
    adapted, adapted_rows = _check(adapted_json, examples=4)
    assert adapted["adapted"] is True and adapted["checkpoint"].endswith("step-00000001") and adapted["limit"] == 4
    assert adapted["settings"]["adapter_parameters"] > 0 and adapted["settings"]["batch_size"] == 4
    assert adapted["settings"]["lm_eval_include"] == str(tasks.resolve())

    r = _invoke([*common, "--base", "--json", str(base_json)])  # no --tasks: every task of the include folder
    assert r.exit_code == 0, r.output
    base, base_rows = _check(base_json, examples=len(RECORDS))  # no --limit: the whole file
    assert base["adapted"] is False and base["settings"]["adapter_parameters"] == 0

    # Same requests, different numbers: lm-eval scored the model with its adapter hooks, not a reloaded copy.
    for a, b in zip(adapted_rows, base_rows, strict=False):
        assert a["prompt"] == b["prompt"] and a["continuations"] == b["continuations"]
    shift = max(
        abs(x - y)
        for a, b in zip(adapted_rows, base_rows, strict=False)
        for x, y in zip(a["loglikelihoods"], b["loglikelihoods"], strict=True)
    )
    assert shift > 1e-3


def test_shipped_demo_tasks_use_the_eval_prompt(monkeypatch, tmp_path):
    """demo/lm_eval on the shipped demo model: both tasks load from demo/data with the LLM-Adapters prompt."""
    monkeypatch.chdir(ROOT)  # the shipped YAMLs name their data files relative to the repository root
    out = tmp_path / "demo.json"
    r = _invoke(["--base", "--recipe", "recipes/demo.yaml", "--lm-eval-include", "demo/lm_eval", "--limit", "3",
                 "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert {n: t["output_type"] for n, t in result["tasks"].items()} == {
        "demo_choice": "multiple_choice",
        "demo_math": "loglikelihood",
    }
    assert all(t["examples"] == 3 and t["total_examples"] == 100 for t in result["tasks"].values())
    rows = [json.loads(line) for line in Path(result["examples_file"]).read_text().splitlines()]
    tests = {n: json.loads((ROOT / "demo" / "data" / n / "test.json").read_text()) for n in result["tasks"]}
    for r in rows:
        record = tests[r["task"]][r["index"]]
        choice = r["task"] == "demo_choice"
        assert r["prompt"] == eval_prompt(record["instruction"], "", commonsense=choice)
        assert r["continuations"] == ([" option1", " option2"] if choice else [record["output"]])


@pytest.mark.parametrize(
    "args,message",
    [
        # lm-eval indexes its ~10,000 bundled task YAMLs to say a name is unknown: 14-56 s here, so slow.
        pytest.param(["--tasks", "no_such_task"], "unknown lm-eval task 'no_such_task'", marks=pytest.mark.slow),
        (["--lm-eval-include", "does/not/exist"], "--lm-eval-include does/not/exist: not a directory"),
        (["--mode", "generation", "--lm-eval-include", "."], "--lm-eval-include only applies with --mode lm-eval"),
        (["--data-dir", "."], "--data-dir holds LLM-Adapters test files for the generation protocol"),
    ],
)
def test_lm_eval_user_errors_are_one_line(setup, args, message):
    root, _, tasks = setup
    args = args if "--lm-eval-include" in args else [*args, "--lm-eval-include", str(tasks)]
    r = _invoke(["--ckpt", str(root / "run"), *args])
    assert r.exit_code == 1
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
