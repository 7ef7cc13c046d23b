"""``perft recipes``: the shipped recipes, inside the installed package (torchtune's ``tune ls`` / ``tune cp``).

The recipes live in the repository's ``recipes/`` folder; the package reaches them as ``perft_cli/recipe_files``
(a link to it in a checkout, a copy in a wheel), so an installed perft lists and copies them without a checkout.
``copy`` rewrites the relative paths a recipe names (``../demo/tiny-moe``) to absolute ones where they exist, so the
copy works from wherever it is written.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from perft_cli.errors import PerftError
from perft_cli.outputs import check_output_file, write_text_atomic

# The recipe keys that hold local paths, resolved against the recipe's folder (config.recipe_from_dict).
PATH_KEY = re.compile(r"^(?P<head>\s*(?:name_or_path|train|data_dir):\s*)(?P<value>[^\s#'\"][^\s#]*)(?P<tail>.*)$")


def shipped() -> dict[str, Path]:
    """Recipe name (file stem) -> path of every shipped recipe, sorted by name."""
    folder = Path(str(resources.files("perft_cli") / "recipe_files"))
    if not folder.is_dir():
        raise PerftError(f"the shipped recipes are missing from this installation ({folder}); reinstall perft-cli")
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def summary(path: Path) -> str:
    """A recipe's first comment line: what it is, in one line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def find(name: str) -> Path:
    """A shipped recipe by name (``demo`` or ``demo.yaml``), or a one-line error listing them."""
    recipes = shipped()
    key = name.removesuffix(".yaml")
    if key not in recipes:
        raise PerftError(f"no shipped recipe {name!r}; the shipped ones are {', '.join(recipes)} (see: perft recipes)")
    return recipes[key]


def copy_recipe(name: str, dest: Path, force: bool = False) -> Path:
    """Write shipped recipe ``name`` to ``dest`` (a file, or a folder to put ``NAME.yaml`` in); returns the file."""
    source = find(name)
    dest = Path(dest).expanduser()
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not force:
        raise PerftError(f"{str(dest)!r} exists; pass --force to replace it, or choose another DEST")
    check_output_file(dest, "DEST", "choose another DEST")
    lines = [_absolute(line, source.resolve().parent) for line in source.read_text(encoding="utf-8").splitlines()]
    write_text_atomic(dest, "\n".join(lines) + "\n")
    return dest


def _absolute(line: str, base: Path) -> str:
    """A ``key: relative/path`` line with the path made absolute when it exists next to the source recipe."""
    m = PATH_KEY.match(line)
    if not m or m["value"].startswith(("/", "~")) or not (base / m["value"]).exists():
        return line  # not a path key, an absolute path, a hub id, or a path that must be made by the user
    return f"{m['head']}{(base / m['value']).resolve()}{m['tail']}"
