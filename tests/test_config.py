"""The strict recipe: every shipped recipe loads, errors name the dotted key, overrides apply."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from perft_cli.config import load_recipe
from perft_cli.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert "mixtral_perft_commonsense.yaml" in names
    assert len(RECIPES) >= 8


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.model.name_or_path
    assert recipe.output_dir


def test_mixtral_commonsense_is_the_paper_setup():
    r = load_recipe(ROOT / "recipes" / "mixtral_perft_commonsense.yaml")
    assert r.model.name_or_path == "mistralai/Mixtral-8x7B-v0.1"
    assert r.adapter.variant == "perft-r"
    assert (r.train.lr, r.train.epochs, r.train.batch_size, r.train.warmup_steps) == (2e-5, 3, 16, 100)
    assert (r.data.cutoff_len, r.data.val_size, r.data.train_on_inputs, r.train.eval_every) == (256, 120, True, 80)
    assert r.adapter.router_aux_loss_coef == 0.02
    assert r.adapter.alpha == 2 * r.adapter.rank and r.adapter.dropout == 0.05
    assert len(r.eval.tasks) == 8 and r.eval.num_beams == 4


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("model: {name_or_path: x}\nadapter: {topk: 2}\n", [], "unknown key 'adapter.topk' (did you mean 'top_k'?)"),
        ("model: {name_or_path: x}\nadaptr: {}\n", [], "unknown key 'adaptr' (did you mean 'adapter'?)"),
        ("model: {name_or_path: x}\nadapter: {rank: many}\n", [], "adapter.rank"),
        ("model: {name_or_path: x}\nadapter: {num_experts: 2, top_k: 3}\n", [], "top_k=3 is larger than"),
        ("model: {name_or_path: x}\n", ["train.lr=.nan"], "train.lr: Input should be a finite number"),
        ("model: {name_or_path: x}\n", ["train.lr=0"], "train.lr"),
        ("model: {name_or_path: x}\n", ["adapter.variant=perft-x"], "adapter.variant"),
        ("model: {name_or_path: x}\n", ["adapter.top_k"], "expected KEY=VALUE"),
        ("model: {name_or_path: x}\n", ["nosuch.key=1"], "SECTION.KEY"),
        ("model: {name_or_path: x}\ntrain: {batch_size: 10, micro_batch_size: 4}\n", [], "not a multiple"),
        ("model: [unclosed\n", [], "not valid YAML at line"),
        ("- a\n- b\n", [], "must be a YAML mapping"),
        ("adapter: {rank: 4}\n", [], "missing section 'model'"),
        # a key written twice (plain YAML keeps the last), a misspelled data.fields name (ignored before)
        ("model: {name_or_path: x}\nadapter:\n  rank: 4\n  rank: 8\n", [], "the key 'rank' is written twice"),
        ("model: {name_or_path: x}\ndata: {fields: {instrution: q}}\n", [], "did you mean 'instruction'?"),
        # keys that YAML does not read as names
        ("1: x\nmodel: {name_or_path: x}\n", [], "unknown key 1 (not a name); sections are"),
        ("model: {name_or_path: x}\nnull: 3\n", [], "unknown key null (not a name)"),
        ("model: {name_or_path: x}\ntrue: 3\n", [], "unknown key true (not a name)"),
        ("model: {name_or_path: x, 1: y}\n", [], "unknown key 1 in section 'model' (not a name); its keys are"),
        # inf and nan in every float field
        ("model: {name_or_path: x}\n", ["train.epochs=.inf"], "train.epochs: Input should be a finite number"),
        ("model: {name_or_path: x}\n", ["train.epochs=.nan"], "train.epochs: Input should be a finite number"),
        ("model: {name_or_path: x}\n", ["train.lr=.inf"], "train.lr: Input should be a finite number"),
        ("model: {name_or_path: x}\n", ["adapter.alpha=.inf"], "adapter.alpha: Input should be a finite number"),
        ("model: {name_or_path: x}\n", ["train.weight_decay=.inf"], "train.weight_decay: Input should be a finite"),
        ("model: {name_or_path: x}\n", ["adapter.router_aux_loss_coef=.inf"], "adapter.router_aux_loss_coef: "),
        ("model: {name_or_path: x}\n", ["adapter.base_aux_loss_coef=.inf"], "adapter.base_aux_loss_coef: Input"),
        ("model: {name_or_path: x}\n", ["train.max_grad_norm=.inf"], "train.max_grad_norm: Input should be a"),
        ("model: {name_or_path: x}\n", ["train.max_steps=.inf"], "train.max_steps: Input should be a finite"),
        ("model: {name_or_path: x}\ntrain: {epochs: .inf}\n", [], "train.epochs: Input should be a finite number"),
        # --set values
        ("model: {name_or_path: x}\n", ["train.epochs=[x"], "--set train.epochs: value '[x' is not valid YAML"),
        ("model: {name_or_path: x}\n", ["adapter.rank=\x01"], "--set adapter.rank: value"),
        ("model: {name_or_path: x}\n", ["output_dir="], "--set output_dir: empty value"),
        ("model: {name_or_path: x}\n", ["data.train=  "], "--set data.train: empty value"),
        ("model: {name_or_path: x\x01}\n", [], "not valid YAML: unacceptable character"),
    ],
)
def test_bad_recipes_give_one_clear_line(tmp_path, text, overrides, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text), overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_and_defaults(tmp_path):
    r = load_recipe(_write(tmp_path, "model: {name_or_path: x}\n"), ["adapter.top_k=1", "eval.tasks=[boolq, piqa]"])
    assert r.adapter.top_k == 1 and r.eval.tasks == ["boolq", "piqa"]
    assert r.output_dir == str(Path("runs") / "r")
    assert r.model.trust_remote_code is False  # never on unless asked


def test_relative_paths_resolve_next_to_the_recipe(tmp_path):
    (tmp_path / "data.json").write_text("[]")
    r = load_recipe(_write(tmp_path, "model: {name_or_path: org/model}\ndata: {train: data.json}\n"))
    assert r.data.train == str((tmp_path / "data.json").resolve())
    assert r.model.name_or_path == "org/model"  # a hub id stays as written


def test_recipe_readme_documents_every_key():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "recipe_docs.py")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout in (ROOT / "recipes" / "README.md").read_text(), "regenerate with scripts/recipe_docs.py"


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("output_dir=[x", "output_dir", "[x"),
        ("output_dir=run #2", "output_dir", "run #2"),
        ("output_dir=2024", "output_dir", "2024"),
        ("output_dir=yes", "output_dir", "yes"),
        ("output_dir=runs/a: b", "output_dir", "runs/a: b"),
        ("output_dir=null", "output_dir", str(Path("runs") / "r")),  # null: none, so the default
        ("data.split=train[:100]", "data.split", "train[:100]"),
        ("model.revision=2024", "model.revision", "2024"),
        ("model.attn_implementation=null", "model.attn_implementation", None),
        ("data.train=~", "data.train", None),
        ("data.train= my data.json ", "data.train", "my data.json"),
    ],
)
def test_set_takes_text_keys_literally(tmp_path, override, key, value):
    """Text keys (paths, names) take the --set value as written; YAML would read '#' as a comment, 2024 as a number."""
    r = load_recipe(_write(tmp_path, "model: {name_or_path: x, attn_implementation: sdpa}\n"), [override])
    obj = r
    for part in key.split("."):
        obj = getattr(obj, part)
    assert obj == value


def test_set_still_parses_other_keys_as_yaml(tmp_path):
    r = load_recipe(
        _write(tmp_path, "model: {name_or_path: x}\n"),
        ["data.fields={instruction: question}", "train.max_steps=null", "model.double_quant=yes", "train.lr=2e-5"],
    )
    assert r.data.fields == {"instruction": "question"} and r.train.max_steps is None
    assert r.model.double_quant is True and r.train.lr == 2e-5


def test_keys_the_variant_never_reads_are_listed():
    from perft_cli.config import ignored_keys, recipe_from_dict

    base = {"model": {"name_or_path": "x"}, "output_dir": "o"}
    r = recipe_from_dict({**base, "adapter": {"variant": "perft-r", "target_modules": ["q_proj"], "top_k": 3}})
    assert ignored_keys(r) == ["adapter.target_modules (only the lora variant read it)"]
    e = recipe_from_dict({**base, "adapter": {"variant": "perft-e", "top_k": 3, "expert": "parallel"}})
    assert ignored_keys(e) == ["adapter.top_k (only perft-r read it)"]
    q = recipe_from_dict({**base, "model": {"name_or_path": "x", "double_quant": True}})
    assert ignored_keys(q) == ["model.double_quant (only quantization: nf4 read it)"]
    assert ignored_keys(recipe_from_dict(base)) == []


def test_an_unknown_key_with_no_close_match_lists_the_sections_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name_or_path: m}\nadapter: {bogus_key_zz: 1}\n")
    with pytest.raises(RecipeError, match=r"unknown key 'adapter.bogus_key_zz'; the keys of 'adapter' are alpha, .*"):
        load_recipe(path)
    with pytest.raises(RecipeError, match=r"^--set: unknown key 'train.qqq'; the keys of 'train' are .*batch_size"):
        load_recipe(_ok(tmp_path), ["train.qqq=1"])
    with pytest.raises(RecipeError, match=r"did you mean 'variant'"):  # a close match is still offered alone
        load_recipe(_ok(tmp_path), ["adapter.varaint=perft-r"])


def _ok(tmp_path: Path) -> Path:
    path = tmp_path / "ok.yaml"
    path.write_text("model: {name_or_path: m}\n")
    return path


def test_a_bad_set_value_names_the_set_not_the_recipe(tmp_path):
    with pytest.raises(RecipeError) as e:
        load_recipe(_ok(tmp_path), ["adapter.rank=abc"])
    assert str(e.value).startswith("--set adapter.rank=abc: adapter.rank: Input should be a valid integer"), e.value
    path = tmp_path / "bad.yaml"
    path.write_text("model: {name_or_path: m}\nadapter: {rank: abc}\n")
    with pytest.raises(RecipeError, match=rf"^recipe {path}: adapter.rank"):  # written in the file: the file is named
        load_recipe(path)


def test_a_recipe_of_megabytes_is_refused_before_parsing(tmp_path, monkeypatch):
    import perft_cli.config

    def never(*args, **kwargs):
        raise AssertionError("the YAML parser ran")  # a 10 MB file kept it busy for minutes

    path = tmp_path / "big.yaml"
    path.write_text("a: " + "x" * 10_000_000 + "\n")
    monkeypatch.setattr(perft_cli.config.yaml, "load", never)
    with pytest.raises(RecipeError, match=r"is 9.5 MiB; a recipe is a few KiB of settings \(at most 1 MiB\)"):
        load_recipe(path)
