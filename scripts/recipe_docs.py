"""Print the key reference of recipes/README.md from the typed recipe (config.py), so the docs cannot drift.

Run:  .venv/bin/python scripts/recipe_docs.py > /tmp/keys.md   (tests/test_config.py checks the README holds it)
"""

from __future__ import annotations

import json

from perft_cli.config import SECTIONS, Recipe


def _type(field) -> str:
    ann = field.annotation
    text = getattr(ann, "__name__", None) if not hasattr(ann, "__args__") else None
    return text or str(ann).replace("typing.", "").replace("Literal", "one of ")


def key_reference() -> str:
    lines = []
    for section, model in SECTIONS.items():
        lines += [f"### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            default = "required" if field.is_required() else json.dumps(field.get_default(call_default_factory=True))
            cells = [f"`{section}.{name}`", _type(field), default, field.description or ""]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    out = Recipe.model_fields["output_dir"]
    lines += ["### top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    lines.append(f"| `output_dir` | str or null | null | {out.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(key_reference(), end="")
