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
