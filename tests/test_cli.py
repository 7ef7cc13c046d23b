"""Bad inputs to `perft train`: each is one readable line on stderr, exit code 1, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


# ---------------------------------------------------------------------------------------------------------------
# Recipe keys that are not names, non-finite floats, --set / --output-dir values, --dry-run with --resume


@pytest.mark.parametrize(
    "text,message",
    [
        ("1: x\nmodel: {name_or_path: m}\n", "unknown key 1 (not a name)"),
        ("model: {name_or_path: m}\nnull: 3\n", "unknown key null (not a name)"),
        ("model: {name_or_path: m, 7: x}\n", "unknown key 7 in section 'model'"),
        ("model: {name_or_path: m}\ntrain: {~: 1}\n", "unknown key null in section 'train'"),
    ],
)
def test_recipe_key_that_is_not_a_name(tmp_path, text, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    fails([recipe], message)


@pytest.mark.parametrize(
    "override",
    [
        "train.epochs=.inf",
        "adapter.alpha=.inf",
        "train.weight_decay=.inf",
        "adapter.router_aux_loss_coef=.inf",
        "adapter.base_aux_loss_coef=.inf",
        "train.max_grad_norm=-.inf",
        "train.epochs=.nan",
        "adapter.alpha=.nan",
    ],
)
def test_non_finite_floats(tmp_path, model, override):
    key = override.partition("=")[0]
    extra = ["--set", "train.max_steps=null"] if key == "train.epochs" else []
    fails([recipe_file(tmp_path, model), *extra, "--set", override], f"{key}: Input should be a finite number")
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_set_value_that_yaml_cannot_parse(tmp_path, model):
    fails([recipe_file(tmp_path, model), "--set", "train.epochs=[x"], "--set train.epochs", "not valid YAML")


@pytest.fixture
def captured_recipe(monkeypatch):
    """Replace run_train: the CLI's final recipe is recorded, nothing is trained."""
    import perft_cli.train

    seen = {}

    def fake_run_train(recipe, **kwargs):
        seen["recipe"], seen["kwargs"] = recipe, kwargs
        return {"status": "done"}

    monkeypatch.setattr(perft_cli.train, "run_train", fake_run_train)
    return seen


@pytest.mark.parametrize("name", ["[x", "run #2", "2024", "yes", "runs/a: b", "null"])
def test_output_dir_is_taken_literally(tmp_path, model, captured_recipe, name):
    result = CliRunner().invoke(app, ["train", str(recipe_file(tmp_path, model)), "--output-dir", name])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert captured_recipe["recipe"].output_dir == name


@pytest.mark.parametrize("name", ["[x", "run #2", "2024", "yes", "runs/a: b"])
def test_set_output_dir_is_taken_literally(tmp_path, model, captured_recipe, name):
    result = CliRunner().invoke(app, ["train", str(recipe_file(tmp_path, model)), "--set", f"output_dir={name}"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert captured_recipe["recipe"].output_dir == name


def test_dry_run_with_resume(tmp_path, model):
    fails([recipe_file(tmp_path, model), "--dry-run", "--resume", tmp_path / "nope_ckpt"], "--resume", "--dry-run")


def test_resume_hint_after_ctrl_c_is_shell_quoted(tmp_path, model, monkeypatch):
    """The "Resume with:" line pastes back into a shell as the same arguments, spaces and brackets included."""
    import shlex

    import perft_cli.train

    saved = tmp_path / "run dir" / "checkpoints" / "step-00000002"
    monkeypatch.setattr(
        perft_cli.train,
        "run_train",
        lambda recipe, **kw: {"status": "interrupted", "step": 2, "last_checkpoint": str(saved)},
    )
    recipe = str(recipe_file(tmp_path, model))
    args = ["--set", "eval.tasks=[demo_choice, demo_math]", "--output-dir", str(tmp_path / "run dir")]
    result = CliRunner().invoke(app, ["train", recipe, *args])
    assert result.exit_code == 130, (result.stderr, result.exception)
    hint = result.stderr.split("Resume with: ", 1)[1].strip()
    assert shlex.split(hint) == ["perft", "train", recipe, *args, "--resume", "auto"]


# ---------------------------------------------------------------------------------------------------------------
# Usage errors found by the command-line parser itself: one line and exit 1 too (Click's default is a box, exit 2)


def one_line(result, *expected: str) -> str:
    stderr = result.stderr
    assert result.exit_code == 1, (result.exit_code, stderr, result.exception)
    assert stderr.startswith("error:") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr + result.stdout and "╭" not in stderr
    for fragment in expected:
        assert fragment in stderr, stderr
    return stderr


@pytest.mark.parametrize(
    "args,expected",
    [
        (["eval", "--ckpt", "x", "--limit", "0"], ["'--limit'", "see 'perft eval --help'"]),
        (["eval", "--ckpt", "x", "--limit", "abc"], ["'--limit'", "integer", "see 'perft eval --help'"]),
        (["eval", "--ckpt", "x", "--max-new-tokens", "0"], ["'--max-new-tokens'"]),
        (["eval", "--mode"], ["'--mode' requires an argument", "see 'perft eval --help'"]),
        (["inspect-routing", "--ckpt", "x", "--collapse-share", "1.5"], ["'--collapse-share'"]),
        (["inspect-routing", "--ckpt", "x", "--batch-size", "0"], ["'--batch-size'", "perft inspect-routing"]),
        (["merge", "--ckpt", "x"], ["missing option '--out'", "see 'perft merge --help'"]),
        (["plan", "r.yaml", "--sett", "adapter.rank=2"], ["no such option: --sett", "see 'perft plan --help'"]),
        (["plan", "r.yaml", "extra"], ["unexpected extra argument", "(extra)"]),
        (["train"], ["missing argument 'recipe'", "see 'perft train --help'"]),
        (["trian", "r.yaml"], ["no such command 'trian' (did you mean 'train'?)", "see 'perft --help'"]),
        (["--bogus"], ["no such option: --bogus", "see 'perft --help'"]),
    ],
)
def test_usage_errors_are_one_line(args, expected):
    one_line(CliRunner().invoke(app, args), *expected)


def _perft(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PERFT_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "perft_cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_usage_errors_through_the_entry_point():
    """`python -m perft_cli` (what the console script runs): one line and exit 1; help and bare `perft` as before."""
    bad = _perft("eval", "--limit", "0")
    assert bad.returncode == 1, bad.stderr
    assert bad.stderr.startswith("error: invalid value for '--limit'") and bad.stderr.count("\n") == 1, bad.stderr
    assert "see 'perft eval --help'" in bad.stderr
    for args in (["--help"], ["train", "--help"]):
        ok = _perft(*args)
        assert ok.returncode == 0 and "Usage" in ok.stdout and not ok.stderr.strip(), (args, ok.stderr)
    version = _perft("--version")
    assert version.returncode == 0 and version.stdout.startswith("perft ")
    bare = _perft()  # no command: the help (Click's no_args_is_help), as before
    assert "Usage" in bare.stdout + bare.stderr and "error:" not in bare.stdout + bare.stderr


PROBE_IMPORTS = """
import sys
from perft_cli.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers", "accelerate", "peft", "datasets") if m in sys.modules)
print("heavy imports:", ",".join(heavy) or "none", file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train", "{typo}"], "unknown key 'adapter.varaint' (did you mean 'variant'?)"),
        (["plan", "{typo}"], "unknown key 'adapter.varaint'"),
        (["train", "{good}", "--set", "adapter.rank=oops"], "adapter.rank"),
        (["train", "{typo}", "--bogus"], "no such option: --bogus"),
        (["train", "{missing}"], "not found"),
        (["eval", "--ckpt", "{missing}"], "does not exist"),
        (["merge", "--ckpt", "{missing}", "--out", "{tmp}/out"], "does not exist"),
        (["inspect-routing", "--ckpt", "{missing}"], "does not exist"),
    ],
)
def test_argument_errors_are_answered_before_torch_is_imported(tmp_path, args, expected):
    """A typo costs well under a second: the one-line answer comes before torch and transformers are imported."""
    typo = tmp_path / "typo.yaml"
    typo.write_text("model: {name_or_path: some/model}\nadapter: {varaint: perft-r}\ndata: {train: d.json}\n")
    good = tmp_path / "good.yaml"
    good.write_text("model: {name_or_path: some/model}\ndata: {train: d.json}\n")
    fill = {"typo": str(typo), "good": str(good), "missing": str(tmp_path / "nope"), "tmp": str(tmp_path)}
    env = {k: v for k, v in os.environ.items() if k != "PERFT_DEBUG"}
    r = subprocess.run(
        [sys.executable, "-c", PROBE_IMPORTS, *[a.format(**fill) for a in args]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert lines[-1] == "heavy imports: none", r.stderr
    assert len(lines) == 2 and lines[0].startswith("error:") and expected in lines[0], r.stderr


@pytest.mark.parametrize("trust", [False, True])
def test_an_unknown_model_type_with_auto_map_is_one_line_and_nothing_before_it(tmp_path, trust):
    model = tmp_path / "fancy"
    model.mkdir()
    auto_map = {"AutoConfig": "configuration_fancy.FancyConfig", "AutoModelForCausalLM": "modeling_fancy.Fancy"}
    (model / "config.json").write_text(json.dumps({"model_type": "my_fancy_moe", "auto_map": auto_map}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {model}, trust_remote_code: {str(trust).lower()}}}\n")
    result = CliRunner().invoke(app, ["plan", str(recipe)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr  # no warning line first
    expected = "configuration_fancy.py" if trust else "needs custom code from its repository"
    assert result.stderr.startswith("error: ") and expected in result.stderr
