"""The PERFT export (perft_cli/merging/export.py, remote_modeling.py, isolated.py): plain transformers loads it with
``trust_remote_code=True`` in a process where perft_cli cannot be imported, and gives load_merged's logits; without
remote code it refuses. Every export of the matrix is checked by one child process (a fixture shared by the module).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import stat

import pytest
import torch
from conftest import ROOT, make_checkpoint
from safetensors.torch import load_file
from typer.testing import CliRunner

from perft_cli.cli import app
from perft_cli.errors import PerftError
from perft_cli.merge import load_merged, run_merge
from perft_cli.merging import export
from perft_cli.merging.isolated import check_isolated, isolated_logits
from perft_cli.merging.verification import SAMPLE_TOKENS, sample_inputs, sample_logits, sample_texts

FAMILIES = ("mixtral", "olmoe", "qwen3_moe", "gpt_oss")
VARIANTS = ("perft-r", "perft-e", "perft-d", "perft-s")
MATRIX = [(f, v, e) for f in FAMILIES for v in VARIANTS for e in ("lora", "parallel")]
EXTRA = {  # name: (family, variant, form, run_merge options)
    "collapsed": ("olmoe", "perft-d", "lora", {"collapse": True}),
    "bf16": ("qwen3_moe", "perft-r", "lora", {"dtype": "bfloat16"}),
    "deepseek_v3": ("deepseek_v3", "perft-e", "lora", {}),  # a dense first layer (no adapter), a float32 router
    "qwen2_moe": ("qwen2_moe", "perft-r", "parallel", {}),  # a shared expert and its gate inside the block
    "no_renormalize": ("mixtral", "perft-r", "lora", {"adapter": {"renormalize": False, "top_k": 3}}),
    "reference_quirk": ("olmoe", "perft-r", "parallel", {"adapter": {"scale_by_base_router": True}}),
}


def _merge(tmp, model_dir, name, variant, form, adapter=None, **options):
    ckpt = make_checkpoint(tmp / f"{name}-ckpt", model_dir, variant, expert=form, **(adapter or {}))
    with contextlib.redirect_stdout(io.StringIO()):
        result = run_merge(ckpt, tmp / name, verify_isolated=False, **options)
    model, tokenizer = load_merged(tmp / name)  # perft's own loader (base/ + the PERFT core)
    logits, ids = sample_logits(model, tokenizer), sample_inputs(tokenizer)["input_ids"]
    return {"out": tmp / name, "ckpt": ckpt, "result": result, "logits": logits, "ids": ids}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model_dir):
    """Every (family, variant, form) export, the extras, and one tampered copy, all loaded by ONE isolated child."""
    tmp = tmp_path_factory.mktemp("exports")
    made = {}
    for family, variant, form in MATRIX:
        made[(family, variant, form)] = _merge(
            tmp, tiny_model_dir(family), f"{family}-{variant}-{form}", variant, form
        )
    for name, (family, variant, form, options) in EXTRA.items():
        made[name] = _merge(tmp, tiny_model_dir(family), name, variant, form, **options)
    # A modeling file that drops the adapters: the isolated check must catch it (the folder would run the base).
    import shutil

    shutil.copytree(tmp / "olmoe-perft-r-lora", tmp / "tampered")
    source = (tmp / "tampered" / export.MODELING_FILE).read_text()
    (tmp / "tampered" / export.MODELING_FILE).write_text(
        source.replace("delta = block.perft_adapter(h)", "delta = 0 * block.perft_adapter(h)")
    )
    made["tampered"] = {**made[("olmoe", "perft-r", "lora")], "out": tmp / "tampered"}
    keys = list(made)
    children = isolated_logits([made[k]["out"] for k in keys], sample_texts(), SAMPLE_TOKENS)
    for key, child in zip(keys, children, strict=True):
        made[key]["child"] = child
    return made


def _check(entry):
    return check_isolated(entry["child"], entry["logits"], entry["ids"], rtol=1e-3)


@pytest.mark.slow  # the 40-export fixture (~25 s); CI and the full suite run it, -m 'not slow' skips it
@pytest.mark.parametrize(("family", "variant", "form"), MATRIX, ids=["-".join(c) for c in MATRIX])
def test_plain_transformers_matches_load_merged(exports, family, variant, form):
    entry = exports[(family, variant, form)]
    child = entry["child"]
    assert child["class"].endswith("modeling_perft.PerftMoeForCausalLM")
    assert child["module_file"].endswith(export.MODELING_FILE) and "transformers_modules" in child["module_file"]
    # The same token ids as perft's tokenizer, the same logits within 1e-3 relative (0 measured: same arithmetic).
    check = _check(entry)
    assert check["passed"], check["failure"]
    assert check["max_abs_logit_diff"] <= 1e-3 * float(entry["logits"].abs().max())
    assert "custom code" in child["refused"] and child["refused"].startswith("ValueError")
    assert entry["result"]["verification"]["passed"]  # perft's own check (load_merged against the unmerged run)


@pytest.mark.slow  # the 40-export fixture (~25 s); CI and the full suite run it, -m 'not slow' skips it
def test_every_export_ships_perfts_own_modeling_file(exports):
    source = export.REMOTE_SOURCE.read_bytes()
    for key, entry in exports.items():
        if key != "tampered":
            assert (entry["out"] / export.MODELING_FILE).read_bytes() == source, key


def test_remote_module_imports_only_torch_and_transformers():
    tree = ast.parse(export.REMOTE_SOURCE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots <= {"__future__", "torch", "transformers"}, roots


@pytest.mark.slow  # the 40-export fixture (~25 s); CI and the full suite run it, -m 'not slow' skips it
def test_the_isolated_child_cannot_import_perft(exports):
    """The child asserted that ``import perft_cli`` fails; its path holds no folder with perft_cli in it."""
    child = exports[("olmoe", "perft-r", "lora")]["child"]
    assert child["class"].startswith("transformers_modules.")
    # Not the repository (the editable install's import hook is a .pth file, which the child does not run); where perft
    # is installed into site-packages itself, the child's import blocker stops it (asserted inside the child).
    assert child["sys_path"] and str(ROOT) not in child["sys_path"] and "" not in child["sys_path"]
    assert not [p for p in child["sys_path"] if "__editable__" in p]
    assert child["perft_cli_modules"] == []


@pytest.mark.slow  # the 40-export fixture (~25 s); CI and the full suite run it, -m 'not slow' skips it
@pytest.mark.parametrize("name", ["no_renormalize", "reference_quirk"])
def test_perft_r_routing_options(exports, name):
    check = _check(exports[name])
    assert check["passed"], check["failure"]
    spec = json.loads((exports[name]["out"] / "config.json").read_text())["perft"]
    assert spec["renormalize"] is (name != "no_renormalize") and spec["scale_by_base_router"] is (
        name != "no_renormalize"
    )


@pytest.mark.slow  # the 40-export fixture (~25 s); CI and the full suite run it, -m 'not slow' skips it
@pytest.mark.parametrize("name", ["deepseek_v3", "qwen2_moe"])
def test_more_families(exports, name):
    check = _check(exports[name])
    assert check["passed"], check["failure"]
    blocks = json.loads((exports[name]["out"] / "config.json").read_text())["perft"]["blocks"]
    assert [b["block"] for b in blocks] == (
        ["model.layers.1.mlp", "model.layers.2.mlp"]
        if name == "deepseek_v3"
        else [
            "model.layers.0.mlp",
            "model.layers.1.mlp",
        ]
    )


@pytest.mark.slow  # the 40-export fixture (~25 s); CI and the full suite run it, -m 'not slow' skips it
def test_tampered_modeling_file_fails_the_check(exports):
    assert "0 * block.perft_adapter(h)" in (exports["tampered"]["out"] / export.MODELING_FILE).read_text()
    check = _check(exports["tampered"])
    assert not check["passed"] and "differ from the unmerged model" in check["failure"]


@pytest.mark.slow  # the 40-export fixture (~25 s); CI and the full suite run it, -m 'not slow' skips it
def test_collapsed_perft_d_is_one_expert_of_rank_n_r(exports):
    entry = exports["collapsed"]
    config = json.loads((entry["out"] / "config.json").read_text())
    assert config["perft"]["variant"] == "perft-s"
    assert {(b["experts"], b["rank"]) for b in config["perft"]["blocks"]} == {(1, 4 * 4)}  # was N=4, r=4
    shapes = {k: tuple(t.shape) for k, t in load_file(entry["out"] / export.ADAPTER_FILE).items()}
    assert set(shapes.values()) == {(1, 64, 16), (1, 16, 64)}
    assert _check(entry)["passed"]
    # Exact: the collapsed export gives the uncollapsed run's logits (perft-d, the four experts summed).
    assert float((entry["logits"] - sample_logits(*load_merged_run(entry["ckpt"]))).abs().max()) <= 1e-5


def load_merged_run(ckpt):
    from perft_cli.modeling import load_trained

    model, tokenizer, *_ = load_trained(ckpt)
    return model, tokenizer


@pytest.mark.slow  # the 40-export fixture (~25 s); CI and the full suite run it, -m 'not slow' skips it
def test_bf16_export_keeps_adapters_in_float32(exports):
    entry = exports["bf16"]
    assert entry["child"]["dtype"] == "bfloat16"
    config = json.loads((entry["out"] / "config.json").read_text())
    assert config["text_config"]["dtype"] == "bfloat16" and config["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(entry["out"] / export.ADAPTER_FILE).values()} == {torch.float32}
    check = _check(entry)
    assert check["passed"], check["failure"]


@pytest.mark.slow  # the 40-export fixture (~25 s); CI and the full suite run it, -m 'not slow' skips it
def test_export_layout_and_permissions(exports):
    out = exports[("mixtral", "perft-e", "lora")]["out"]
    names = {p.name for p in out.iterdir()}
    assert {export.MODELING_FILE, export.WEIGHTS_FILE, export.ADAPTER_FILE, export.INDEX_FILE, "config.json"} <= names
    assert {"generation_config.json", "tokenizer.json", "README.md", "recipe.yaml", "base"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "perft_moe" and config["architectures"] == ["PerftMoeForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_perft.PerftMoeForCausalLM"
    assert config["text_config"]["model_type"] == "mixtral"
    index = json.loads((out / export.INDEX_FILE).read_text())["weight_map"]
    adapters = sorted(k for k, f in index.items() if f == export.ADAPTER_FILE)
    assert adapters and all(".mlp.perft_adapter.experts.perft_" in k for k in adapters)
    assert not [k for k, f in index.items() if f == export.WEIGHTS_FILE and "perft_" in k]
    mask = os.umask(0)
    os.umask(mask)
    for p in out.rglob("*"):
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "refuses" in card


def test_run_merge_checks_the_export_in_an_isolated_process(tiny_model_dir, tmp_path):
    """The default merge path: verification includes the perft-free child (here via the CLI, with --dtype)."""
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("gpt_oss"), "perft-e", expert="parallel")
    done = CliRunner().invoke(
        app, ["merge", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--dtype", "float32"]
    )
    assert done.exit_code == 0, done.output
    assert "plain transformers (perft not importable)" in done.output and "trust_remote_code=True" in done.output
    iso = json.loads((tmp_path / "out" / "perft-merge.json").read_text())["verification"]["isolated"]
    assert iso["passed"] and iso["max_abs_logit_diff"] <= iso["tolerance"]
    assert "custom code" in iso["refused_without_remote_code"]


@pytest.mark.parametrize(
    ("variant", "options", "message"),
    [
        ("perft-r", {"fmt": "peft"}, "--format peft writes a peft LoRA adapter folder; this run is perft-r"),
        ("perft-r", {"collapse": True}, "--collapse folds PERFT-D's N always-on lora experts"),
        ("lora", {"dtype": "float64"}, "--dtype 'float64': expected one of bfloat16, float16, float32"),
        ("lora", {"fmt": "onnx"}, "--format 'onnx': expected 'model'"),
    ],
)
def test_bad_options_fail_before_loading(variant, options, message, tiny_model_dir, tmp_path, monkeypatch):
    import perft_cli.modeling

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), variant)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(perft_cli.modeling, "load_model", refuse)
    with pytest.raises(PerftError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_merge(ckpt, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_lora_peft_format_round_trip(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perft_cli.modeling import load_trained

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"), "lora")
    result = run_merge(ckpt, tmp_path / "out", fmt="peft")
    assert result["verification"]["passed"] and result["format"] == "peft" and not result["folded"]
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names and "config.json" not in names
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir("olmoe")) and config["peft_type"] == "LORA"
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tmp_path / "out")).eval()
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2 * 2  # q, v on both layers
    got = sample_logits(model, AutoTokenizer.from_pretrained(tmp_path / "out"))
    unmerged, tok, *_ = load_trained(ckpt)
    reference = sample_logits(unmerged, tok)
    assert float((got - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    with model.disable_adapter():  # the LoRA weights matter: without them the logits move
        plain = sample_logits(model, tok)
    assert float((plain - reference).abs().max()) > 1e-3 * float(reference.abs().max())
