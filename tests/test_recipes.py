"""``perft recipes``: the shipped recipes are in the package, listed one line each, copied to edit."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from perft_cli.cli import app
from perft_cli.config import load_recipe
from perft_cli.recipes import shipped

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_ships_every_recipe_of_the_repository():
    assert sorted(shipped()) == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def test_perft_recipes_lists_one_line_each():
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(shipped())
    line = next(x for x in lines if x.split()[0] == "mixtral_perft_commonsense")
    assert "the paper's Mixtral commonsense setup" in line


def test_copy_writes_a_recipe_that_loads_from_anywhere(tmp_path, monkeypatch):
    dest = tmp_path / "elsewhere" / "mine.yaml"
    result = CliRunner().invoke(app, ["recipes", "copy", "demo", str(dest)])
    assert result.exit_code == 0, result.output
    assert "perft validate" in result.stderr
    text = dest.read_text()
    assert text.startswith("# The embedded demo")  # the comments travel with it
    raw = yaml.safe_load(text)
    assert Path(raw["model"]["name_or_path"]) == ROOT / "demo" / "tiny-moe"  # made absolute: it exists there
    monkeypatch.chdir(tmp_path)
    copied, original = load_recipe(dest), load_recipe(ROOT / "recipes" / "demo.yaml")
    assert copied.model_dump(exclude={"output_dir"}) == original.model_dump(exclude={"output_dir"})
    again = CliRunner().invoke(app, ["recipes", "copy", "demo", str(dest)])
    assert again.exit_code == 1 and "exists; pass --force" in again.stderr
    assert CliRunner().invoke(app, ["recipes", "copy", "demo", str(dest), "--force"]).exit_code == 0
    into = CliRunner().invoke(app, ["recipes", "copy", "olmoe_perft_r_commonsense.yaml", str(tmp_path)])
    assert into.exit_code == 0 and (tmp_path / "olmoe_perft_r_commonsense.yaml").is_file()


def test_an_unknown_recipe_names_the_shipped_ones(tmp_path):
    result = CliRunner().invoke(app, ["recipes", "copy", "nope", str(tmp_path / "x.yaml")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "no shipped recipe 'nope'; the shipped ones are demo, " in result.stderr


def test_olmoe_recipes_reproduce_the_papers_code_beside_its_equation():
    for task in ("commonsense", "math"):
        equation = load_recipe(ROOT / "recipes" / f"olmoe_perft_r_{task}.yaml")
        code = load_recipe(ROOT / "recipes" / f"olmoe_perft_r_{task}_paper_code.yaml")
        assert not equation.adapter.scale_by_base_router and code.adapter.scale_by_base_router
        assert equation.model_dump(exclude={"adapter", "output_dir"}) == code.model_dump(
            exclude={"adapter", "output_dir"}
        )
        assert (
            "paper's released OLMoE code" in (ROOT / "recipes" / f"olmoe_perft_r_{task}_paper_code.yaml").read_text()
        )
