"""Bad inputs to `perft train`: each is one readable line on stderr, exit code 1, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_recipe
from typer.testing import CliRunner

from perft_cli.cli import app

RECORDS = [{"instruction": f"Say {w}.", "input": "", "output": w, "answer": w} for w in ("a", "b", "c", "d", "e", "f")]


@pytest.fixture(scope="module")
def dense_model_dirs(tmp_path_factory):
    """A saved tiny Llama (not an MoE family) and a Qwen2-MoE whose layers are all dense (no MoE block)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from perft_cli.tiny import byte_tokenizer, save_tiny

    llama = tmp_path_factory.mktemp("llama")
    config = AutoConfig.for_model(
        "llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(llama)
    byte_tokenizer().save_pretrained(llama)
    dense_qwen = save_tiny(tmp_path_factory.mktemp("qwen-dense"), "qwen2_moe", mlp_only_layers=[0, 1])
    return {"llama": llama, "dense_qwen": dense_qwen}


def recipe_file(tmp_path: Path, model_dir: Path, records=RECORDS, data_text: str | None = None, **sections) -> Path:
    data = tmp_path / "data.json"
    data.write_text(data_text if data_text is not None else json.dumps(records))
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": {"variant": "perft-r", "num_experts": 4, "top_k": 2, "rank": 2},
        "data": {"train": str(data), "cutoff_len": 64, "val_size": 2},
        "train": {"max_steps": 1, "batch_size": 2, "micro_batch_size": 2},
        "output_dir": str(tmp_path / "run"),
    }
    return write_recipe(tmp_path, raw, **sections)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("PERFT_DEBUG", raising=False)  # PERFT_DEBUG=1 would re-raise with a traceback


def fails(args: list[str], *expected: str) -> str:
    """Run `perft train ARGS`: exit 1, one `error:` line naming every expected fragment, no traceback."""
    result = CliRunner().invoke(app, ["train", *[str(a) for a in args]])
    stderr = result.stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1, (result.exit_code, stderr, result.exception)
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr + result.stdout
    for fragment in expected:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def model(tiny_model_dir):
    return tiny_model_dir("olmoe")


def test_unknown_recipe_key(tmp_path, model):
    fails([recipe_file(tmp_path, model, train={"learning_rate": 1e-4})], "unknown key 'train.learning_rate'")


def test_wrong_type(tmp_path, model):
    fails([recipe_file(tmp_path, model), "--set", "train.batch_size=abc"], "train.batch_size", "integer")


def test_top_k_larger_than_num_experts(tmp_path, model):
    fails([recipe_file(tmp_path, model), "--set", "adapter.top_k=8"], "top_k=8", "num_experts=4")


def test_non_finite_learning_rate(tmp_path, model):
    fails([recipe_file(tmp_path, model), "--set", "train.lr=.nan"], "train.lr", "finite")


def test_missing_data_file(tmp_path, model):
    fails([recipe_file(tmp_path, model), "--set", f"data.train={tmp_path / 'nope.json'}"], "nope.json", "not found")


def test_malformed_json(tmp_path, model):
    fails([recipe_file(tmp_path, model, data_text='[{"instruction": "a",\n "output": }]')], "data.json", "line 2")


def test_record_without_output(tmp_path, model):
    records = RECORDS[:3] + [{"instruction": "no answer", "input": ""}]
    fails([recipe_file(tmp_path, model, records=records)], "data.json", "record 4", "'output' is missing")


def test_empty_dataset(tmp_path, model):
    fails([recipe_file(tmp_path, model, records=[])], "data.json", "no records")


def test_too_few_records_for_the_held_out_split(tmp_path, model):
    fails([recipe_file(tmp_path, model), "--set", "data.val_size=6"], "6 records", "data.val_size")


def test_unsupported_model_type(tmp_path, dense_model_dirs):
    fails([recipe_file(tmp_path, dense_model_dirs["llama"])], "'llama'", "not a supported MoE family")


def test_perft_e_on_a_model_without_moe_layers(tmp_path, dense_model_dirs):
    recipe = recipe_file(tmp_path, dense_model_dirs["dense_qwen"], adapter={"variant": "perft-e"})
    fails([recipe], "no MoE blocks")


def test_unwritable_output_dir(tmp_path, model):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A file where a directory should be: unwritable even as root (chmod does not stop root).
    fails([recipe_file(tmp_path, model), "--output-dir", blocker / "run"], "cannot write to the output directory")


def test_resume_from_another_variant(tmp_path, model):
    from conftest import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "other" / "checkpoints" / "step-00000001", model, variant="perft-d")
    fails([recipe_file(tmp_path, model), "--resume", ckpt], "cannot resume", "adapter.variant='perft-d'", "perft-r")


def test_resume_from_a_weights_only_checkpoint(tmp_path, model):
    from conftest import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "other" / "step-00000001", model, rank=2)  # no optimizer / RNG state
    fails([recipe_file(tmp_path, model), "--resume", ckpt], "cannot be resumed", "optimizer.safetensors")


def test_resume_missing_checkpoint(tmp_path, model):
    fails([recipe_file(tmp_path, model), "--resume", tmp_path / "nowhere"], "--resume", "does not exist")


def test_fresh_run_into_a_run_with_checkpoints(tmp_path, model):
    from conftest import make_checkpoint

    make_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000003", model)
    fails([recipe_file(tmp_path, model)], "already holds checkpoints", "--resume auto")


def test_batch_not_divisible(tmp_path, model):
    fails([recipe_file(tmp_path, model), "--set", "train.micro_batch_size=3"], "train.batch_size=2", "multiple")


def test_tracker_package_missing(tmp_path, model):
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    fails([recipe_file(tmp_path, model), "--set", "train.report_to=[wandb]"], "wandb", "not installed")


def test_json_without_dry_run(tmp_path, model):
    fails([recipe_file(tmp_path, model), "--json"], "--json", "--dry-run")


def test_nf4_check_fails_loudly_when_experts_stay_16_bit(tmp_path, model, monkeypatch):
    """--dry-run with nf4 asked for but a backbone whose routed experts are not 4-bit: exit 1 naming them."""
    import perft_cli.modeling as modeling
    from perft_cli.config import ModelConfig

    real = modeling.load_model
    monkeypatch.setattr(
        modeling, "load_model", lambda cfg: real(ModelConfig(**{**cfg.model_dump(), "quantization": "none"}))
    )
    fails([recipe_file(tmp_path, model), "--set", "model.quantization=nf4", "--dry-run"], "nf4", "not 4-bit")
