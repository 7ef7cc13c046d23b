"""Damaged models, damaged checkpoints and failed starts: one-line errors, and nothing in a run directory changed.

Each case here was a traceback (or a silently broken run) before; the inputs are real files damaged on purpose.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from perft_cli.checkpoint import (
    OPTIMIZER_FILE,
    RECIPE_FILE,
    best_checkpoint,
    latest_checkpoint,
    load_checkpoint_recipe,
)
from perft_cli.config import ModelConfig, load_recipe
from perft_cli.errors import CheckpointError, DataError, ModelError
from perft_cli.modeling import load_config, load_model, load_tokenizer
from perft_cli.train import run_train
from perft_cli.training.resume import read_training_state

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def _copy(model_dir: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns(*skip))
    return dest


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_model_folder_without_tokenizer_files(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir("olmoe"), tmp_path / "m", skip=TOKENIZER_FILES)
    with pytest.raises(ModelError) as e:
        load_tokenizer(ModelConfig(name_or_path=str(folder)))
    assert "no usable tokenizer" in _one_line(e)


def test_truncated_weights_and_bad_load_settings(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir("olmoe"), tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError) as e:
        load_model(ModelConfig(name_or_path=str(folder), dtype="float32"))
    assert "cannot load the weights" in _one_line(e)
    good = str(tiny_model_dir("olmoe"))
    with pytest.raises(ModelError) as e:
        load_model(ModelConfig(name_or_path=good, dtype="float32", attn_implementation="bogus"))
    assert "check model.attn_implementation" in _one_line(e)


@pytest.mark.parametrize(
    "config,match",
    [
        ([1, 2], "cannot read the config"),
        ("{bad", "config.json"),
    ],
)
def test_broken_config_json(tmp_path, config, match):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ModelError) as e:
        load_config(ModelConfig(name_or_path=str(folder)))
    msg = _one_line(e)
    assert match in msg and "hub" not in msg  # a local folder: no hub advice


def test_config_routing_more_experts_than_it_has(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir("olmoe"), tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts_per_tok"] = cfg["num_experts"] * 2
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as e:
        load_config(ModelConfig(name_or_path=str(folder)))
    assert "num_experts_per_tok=" in _one_line(e)


@pytest.fixture
def trained_run(tmp_path, tiny_model_dir):
    from test_train import make_recipe

    recipe = load_recipe(make_recipe(tmp_path / "r", tiny_model_dir("olmoe"), train={"max_steps": 2}))
    run_train(recipe)
    return Path(recipe.output_dir), recipe


def test_damaged_checkpoint_files_are_one_line(trained_run, tmp_path):
    run, _ = trained_run
    ckpt = latest_checkpoint(run)
    damaged = shutil.copytree(ckpt, tmp_path / "d1")
    (damaged / OPTIMIZER_FILE).write_bytes((damaged / OPTIMIZER_FILE).read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        read_training_state(damaged)
    assert "cannot be resumed: optimizer.safetensors" in _one_line(e)
    (damaged / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError) as e:
        read_training_state(damaged)
    assert "cannot be resumed: trainer_state.json: JSONDecodeError" in _one_line(e)
    for text, match in ((b"\xff\xfe\x00bad", "damaged"), (b"model: [\n  x: 1\n", "line")):
        bad = shutil.copytree(ckpt, tmp_path / f"d{len(text)}")
        (bad / RECIPE_FILE).write_bytes(text)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint_recipe(bad)
        assert match in _one_line(e)
    for best in ("[]", '{"checkpoint": null}'):
        (run / "best.json").write_text(best)
        assert best_checkpoint(run) is None


def test_a_failed_start_changes_nothing(trained_run, tmp_path, tiny_model_dir):
    from test_train import make_recipe

    run, recipe = trained_run
    before = (run / RECIPE_FILE).read_text()
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"instruction": "x"}]))  # no output field
    bad = load_recipe(make_recipe(tmp_path / "b", tiny_model_dir("olmoe"), broken, output_dir=str(run)))
    with pytest.raises(DataError):
        run_train(bad, resume="auto")
    assert (run / RECIPE_FILE).read_text() == before  # the run's recipe still names what it trained

    fresh = load_recipe(make_recipe(tmp_path / "c", tiny_model_dir("olmoe"), broken, output_dir=str(tmp_path / "new")))
    with pytest.raises(DataError):
        run_train(fresh)
    assert not (tmp_path / "new").exists()  # no directory left for a run that never started


def test_checkpoint_whose_base_model_moved_names_the_recipe_to_edit(trained_run, tmp_path, tiny_model_dir):
    from perft_cli.modeling import load_trained

    run, _ = trained_run
    ckpt = shutil.copytree(latest_checkpoint(run), tmp_path / "ck")
    text = (ckpt / RECIPE_FILE).read_text().replace(str(tiny_model_dir("olmoe")), str(tmp_path / "moved-away"))
    (ckpt / RECIPE_FILE).write_text(text)
    with pytest.raises(CheckpointError) as e:
        load_trained(ckpt)
    assert "does not exist any more" in _one_line(e) and str(ckpt / RECIPE_FILE) in str(e.value)


def test_unknown_eval_task_and_unused_keys_are_flagged_when_training_starts(tmp_path, tiny_model_dir, capsys):
    from test_train import make_recipe

    recipe = load_recipe(
        make_recipe(
            tmp_path,
            tiny_model_dir("olmoe"),
            train={"max_steps": 1},
            eval={"tasks": ["boolq", "bogus_task"]},
            adapter={"variant": "perft-r", "num_experts": 4, "top_k": 2, "rank": 4, "target_modules": ["q_proj"]},
        )
    )
    run_train(recipe)
    err = " ".join(capsys.readouterr().err.split())
    assert "eval.tasks: unknown task 'bogus_task'" in err
    assert "set but not used by adapter.variant=perft-r: adapter.target_modules (only the lora variant" in err
