"""`perft merge`: every variant's output reproduces the unmerged model; a LoRA merge is plain transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from conftest import make_checkpoint
from typer.testing import CliRunner

from perft_cli.checkpoint import resolve_checkpoint
from perft_cli.cli import app
from perft_cli.errors import PerftError
from perft_cli.merge import load_merged, run_merge
from perft_cli.merging import fold, verification
from perft_cli.merging.verification import sample_logits
from perft_cli.modeling import load_trained
from perft_cli.tiny import save_tiny

CASES = [
    ("lora", "lora"),
    ("perft-r", "lora"),
    ("perft-r", "parallel"),
    ("perft-e", "lora"),
    ("perft-e", "parallel"),
    ("perft-d", "lora"),
    ("perft-d", "parallel"),
    ("perft-s", "lora"),
    ("perft-s", "parallel"),
]


def unmerged_logits(ckpt) -> torch.Tensor:
    model, tokenizer, *_ = load_trained(ckpt)
    return sample_logits(model, tokenizer)  # [P, V]


def set_recipe(ckpt, section: str, **values) -> None:
    recipe = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    recipe[section].update(values)
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(recipe))


@pytest.mark.parametrize(("variant", "form"), CASES, ids=[f"{v}-{f}" for v, f in CASES])
def test_merged_matches_unmerged(variant, form, tiny_model_dir, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), variant, expert=form)
    # The plain-transformers check in a perft-free child is tested in test_merging_export.py (one child for all).
    result = run_merge(ckpt, tmp_path / "out", verify_isolated=False)
    v = result["verification"]
    assert v["passed"] and v["max_abs_logit_diff"] <= v["tolerance"] == pytest.approx(1e-4 * v["max_abs_logit"])
    # An independent check of the printed claim: reload the output and compare with the unmerged model here.
    model, tokenizer = load_merged(tmp_path / "out")
    diff = (sample_logits(model, tokenizer) - unmerged_logits(ckpt)).abs().max()
    assert float(diff) <= v["tolerance"]
    files = {p.name for p in (tmp_path / "out").iterdir()}
    weights = "model.safetensors" if variant == "lora" else "model-base.safetensors"
    assert {weights, "config.json", "tokenizer.json", "README.md", "perft-merge.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    assert result["folded"] == (variant == "lora")
    if variant != "lora":
        assert resolve_checkpoint(tmp_path / "out") == tmp_path / "out"  # `perft eval --ckpt OUT` takes it
        assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["model"]["name_or_path"] == "base"
        assert "cannot be folded" in result["action"] and "trust_remote_code=True" in result["action"]


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_lora_merge_is_plain_transformers(family, tiny_model_dir, tmp_path):
    """q/v (DeepSeek: q_proj/kv_b_proj; gpt-oss: with biases) folded; loads with no adapter code at all."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir(family), "lora")
    result = run_merge(ckpt, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]
    assert not [m for m in model.modules() if isinstance(m, BaseTunerLayer) or type(m).__module__.startswith("peft")]
    assert not hasattr(model, "peft_config")
    diff = (sample_logits(model, AutoTokenizer.from_pretrained(tmp_path / "out")) - unmerged_logits(ckpt)).abs()
    assert float(diff.max()) <= result["verification"]["tolerance"]
    assert result["verification"]["fold_error_rounding_units"] <= 1.0


def test_bf16_lora_merge(tiny_model_dir, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), "lora")
    set_recipe(ckpt, "model", dtype="bfloat16")
    v = run_merge(ckpt, tmp_path / "out")["verification"]
    assert v["passed"] and v["rtol"] == verification.RTOL["bfloat16"]
    assert v["fold_error_rounding_units"] <= 1.0  # the fold is exact up to bf16 storage rounding
    assert v["roundtrip_max_abs_diff"] <= 1e-4 * v["max_abs_logit"]  # save + reload changed nothing
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_stands_alone(tmp_path):
    """A PERFT export needs neither the run directory nor the original model directory."""
    model_dir = save_tiny(tmp_path / "model", "qwen2_moe")
    ckpt = make_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002", model_dir, "perft-r")
    (tmp_path / "run" / "eval").mkdir()
    evaluation = {"tasks": {"boolq": {"accuracy": 0.625, "examples": 8}}, "averages": {"commonsense": 0.625}}
    (tmp_path / "run" / "eval" / "step-00000002-adapted.json").write_text(json.dumps(evaluation))
    reference = unmerged_logits(ckpt)
    run_merge(tmp_path / "run", tmp_path / "out", verify_isolated=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "perft-r" in card and "N=4" in card and "top-K=2" in card and "r=4" in card and "load_merged" in card
    assert "| boolq | 0.6250 | 8 |" in card and (tmp_path / "out" / "eval" / "step-00000002-adapted.json").is_file()
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(model_dir)
    moved = shutil.move(tmp_path / "out", tmp_path / "elsewhere")
    model, tokenizer = load_merged(moved)
    assert float((sample_logits(model, tokenizer) - reference).abs().max()) == 0.0


def test_nf4_run_exports_unquantized_base(tiny_model_dir, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), "perft-e")
    set_recipe(ckpt, "model", quantization="nf4")
    result = run_merge(ckpt, tmp_path / "out", verify_isolated=False)
    assert any("nf4" in note and "unquantized" in note for note in result["notes"])
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["model"]["quantization"] == "none"
    assert result["verification"]["passed"]


def test_wrong_merge_fails_and_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """A fold that silently drops the LoRA weights is caught by the logit check; nothing is written."""
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), "lora")

    def unwrap_only(model):
        from peft.tuners.lora import LoraLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.get_base_layer())
        return [], 0.0

    monkeypatch.setattr(fold, "fold_lora", unwrap_only)
    with pytest.raises(PerftError, match="merge verification failed"):
        run_merge(ckpt, tmp_path / "new" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no temporary or parent directory


def test_cli_refuses_non_empty_out(tiny_model_dir, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), "perft-s")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    runner = CliRunner()
    refused = runner.invoke(app, ["merge", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    assert refused.exit_code == 1 and "--force" in refused.output and "Traceback" not in refused.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    into_ckpt = runner.invoke(app, ["merge", "--ckpt", str(ckpt), "--out", str(tmp_path), "--force"])
    assert into_ckpt.exit_code == 1 and "holds the checkpoint" in into_ckpt.output
    done = runner.invoke(app, ["merge", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--force"])
    assert done.exit_code == 0, done.output
    assert "cannot be folded" in done.output and "verified" in done.output
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "adapter.safetensors").is_file()


@pytest.mark.parametrize(
    "out,message",
    [
        ("afile.txt/sub", "--out '{tmp}/afile.txt/sub' cannot be created: '{tmp}/afile.txt' is a file, not a folder"),
        ("afile.txt/a/b", "'{tmp}/afile.txt' is a file, not a folder; choose another directory"),
        ("afile.txt", "--out '{tmp}/afile.txt' is a file; pass a directory"),
    ],
)
def test_cli_out_below_a_file_fails_before_loading(out, message, tmp_path, monkeypatch):
    import perft_cli.modeling

    (tmp_path / "ckpt").mkdir()
    for name in ("adapter.safetensors", "recipe.yaml"):  # resolve_checkpoint accepts it; nothing else reads it
        (tmp_path / "ckpt" / name).write_text("")
    (tmp_path / "afile.txt").write_text("hi")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(perft_cli.modeling, "load_model", refuse)
    result = CliRunner().invoke(app, ["merge", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / out)])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "Traceback" not in result.output
    assert message.format(tmp=tmp_path) in result.output
    assert (tmp_path / "afile.txt").read_text() == "hi"


def test_merged_lora_output_passed_as_ckpt(tiny_model_dir, tmp_path):
    """eval, inspect-routing and merge say what a LoRA merge output is, and eval's advice runs as written."""
    import shlex

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), "lora")
    set_recipe(ckpt, "data", cutoff_len=32)
    run_merge(ckpt, tmp_path / "out")
    runner = CliRunner()
    said = {}
    for command in ("eval", "inspect-routing", "merge"):
        args = [command, "--ckpt", str(tmp_path / "out")] + (
            ["--out", str(tmp_path / "x")] if command == "merge" else []
        )
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and result.output.count("\n") == 1 and "Traceback" not in result.output
        assert f"--ckpt {str(tmp_path / 'out')!r} is a merged LoRA model written by perft merge" in result.output
        assert "has the run saved yet" not in result.output
        said[command] = result.output
    assert f"pass the run it was merged from (its perft-merge.json names {str(ckpt)!r})" in said["inspect-routing"]
    assert "nothing left to merge" in said["merge"] and "AutoModelForCausalLM.from_pretrained" in said["merge"]
    advice = said["eval"].split("evaluate it as a base model: ")[1].strip()
    assert advice == (
        f"perft eval --base --recipe {ckpt / 'recipe.yaml'} --set model.name_or_path={(tmp_path / 'out').resolve()}"
    )
    data = tmp_path / "data" / "demo_math"
    data.mkdir(parents=True)
    (data / "test.json").write_text(json.dumps([{"instruction": "What is 1 + 2?", "input": "", "answer": "3"}]))
    more = ["--tasks", "demo_math", "--data-dir", str(data.parent), "--json", str(tmp_path / "res.json")]
    more += ["--set", "eval.max_new_tokens=2"]
    evaluated = runner.invoke(app, [*shlex.split(advice)[1:], *more])
    assert evaluated.exit_code == 0, evaluated.output
    result = json.loads((tmp_path / "res.json").read_text())
    assert result["model"] == str((tmp_path / "out").resolve()) and result["adapted"] is False


def test_a_non_finite_adapter_is_named_not_a_failed_verification(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"))
    weights = load_file(str(ckpt / "adapter.safetensors"))
    name = sorted(weights)[1]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(ckpt / "adapter.safetensors"))
    result = CliRunner().invoke(app, ["merge", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert f"holds non-finite values in {name}" in result.stderr and "verification" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_wrong_shaped_adapter_tensor_is_one_line_before_any_progress(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    import perft_cli.modeling

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"))
    weights = load_file(str(ckpt / "adapter.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name][..., :1].contiguous()  # a tensor of another shape (a foreign or damaged file)
    save_file(weights, str(ckpt / "adapter.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(perft_cli.modeling, "load_model", refuse)
    result = CliRunner().invoke(app, ["merge", "--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output  # no "loading ..." line first
    assert f"adapter weight {name} has shape" in result.stderr and "another adapter or model" in result.stderr
