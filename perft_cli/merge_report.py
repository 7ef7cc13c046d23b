"""What a merge tells its user: the README.md model card written into the output and the terminal summary, and
what ``--ckpt`` says when it is given a merge output (or any model folder) that is not a perft checkpoint.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from perft_cli.checkpoint import ADAPTER_FILE, RECIPE_FILE
from perft_cli.errors import CheckpointError

MERGE_FILE = "perft-merge.json"


def check_ckpt_arg(ckpt: str | Path, command: str) -> None:
    """A one-line CheckpointError when ``--ckpt`` names a file, a merged LoRA model or a plain model folder.

    Those are not runs that have not saved yet (``resolve_checkpoint``'s advice): say what the path is and what
    ``perft <command>`` can do with it. A run, a checkpoint, a PERFT export (a checkpoint itself) or a missing path
    passes, for ``resolve_checkpoint`` to handle.
    """
    path = Path(ckpt)
    if path.is_file():
        raise CheckpointError(
            f"--ckpt {str(path)!r} is a file; pass a run directory (the --output-dir of perft train) or one of its "
            "checkpoints/step-N directories"
        )
    if not path.is_dir() or (path / ADAPTER_FILE).is_file() or not (path / "config.json").is_file():
        return
    info = _merge_info(path)
    source = info.get("checkpoint") if info else None
    merged_from = f" (its {MERGE_FILE} names {source!r})" if isinstance(source, str) else ""
    if info is not None:
        what = (
            f"--ckpt {str(path)!r} is a merged LoRA model written by perft merge: a plain transformers model with "
            "the LoRA weights folded in, no adapters to load"
        )
    else:
        what = f"--ckpt {str(path)!r} is a model folder (config.json, no adapter.safetensors), not a perft checkpoint"
    if command == "eval":
        name = shlex.quote(f"model.name_or_path={path.resolve()}")
        recipe = (
            str(Path(source, RECIPE_FILE)) if isinstance(source, str) and Path(source, RECIPE_FILE).is_file() else ""
        )
        fix = (
            f"evaluate it as a base model: perft eval --base --recipe {shlex.quote(recipe) if recipe else 'R.yaml'} "
            f"--set {name}" + ("" if recipe else " (R.yaml: any recipe; --set replaces its model)")
        )
    elif command == "merge":
        fix = (
            "there is nothing left to merge: load it with AutoModelForCausalLM.from_pretrained, or merge the run it "
            f"came from{merged_from}"
            if info is not None
            else "pass the run directory perft train wrote (or one of its checkpoints)"
        )
    else:  # inspect-routing compares the routing with the adapters attached and detached
        fix = (
            f"routing before and after fine-tuning needs the adapters: pass the run it was merged from{merged_from}"
            if info is not None
            else "pass the run directory perft train wrote (or one of its checkpoints)"
        )
    raise CheckpointError(f"{what}; {fix}")


def _merge_info(path: Path) -> dict[str, Any] | None:
    """The ``perft-merge.json`` of a LoRA merge output (folded weights, no adapter file), else None."""
    try:
        info = json.loads((path / MERGE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and (info.get("folded") or info.get("variant") == "lora") else None


def _eval_rows(data: Any) -> list[tuple[str, str, str]]:
    """(task, accuracy, examples) rows from a ``perft eval`` results JSON ({"tasks": {...}, "averages": {...}})."""
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
        return []
    rows = []
    for task, res in data["tasks"].items():
        if isinstance(res, dict) and isinstance(res.get("accuracy"), int | float):
            rows.append((str(task), f"{res['accuracy']:.4f}", str(res.get("examples", ""))))
    for kind, value in (data.get("averages") or {}).items():
        if isinstance(value, int | float):
            rows.append((f"average ({kind})", f"{value:.4f}", ""))
    return rows


def model_card(recipe: Any, result: dict[str, Any], family: str) -> str:
    """README.md of the output: base model, variant, N/K/r, how to load, verification, eval results, recipe."""
    a, variant = recipe.adapter, result["variant"]
    base = recipe.model.name_or_path
    hub_like = not Path(base).exists() and base.count("/") <= 1
    front = ["---", "library_name: " + ("transformers" if variant == "lora" else "perft-cli"), "tags: [perft, moe]"]
    front += [f"base_model: {base}"] if hub_like else []
    shape = {
        "perft-r": f"N={a.num_experts} PEFT experts, top-K={a.top_k} by a new router",
        "perft-e": "one PEFT expert per base expert, gated by the frozen router",
        "perft-d": f"N={a.num_experts} always-active PEFT experts",
        "perft-s": "one always-active PEFT expert",
        "lora": f"LoRA on {', '.join(a.target_modules or ['the attention q/v projections'])}",
    }[variant]
    v = result["verification"]
    lines = [
        *front,
        "---",
        f"# {variant} fine-tune of {Path(base).name if not hub_like else base}",
        "",
        f"- base model: `{base}` ({family}), weights in {result['dtype']}",
        f"- adapter: {variant}, {shape}; rank r={a.rank}, alpha={a.alpha if a.alpha is not None else 2 * a.rank}"
        + (f", expert form {a.expert}" if variant != "lora" else ""),
        f"- merge: {result['action']}",
        *[f"- note: {n}" for n in result["notes"]],
        f"- verified: max |logit difference| to the unmerged model {v['max_abs_logit_diff']:.3g} on "
        f"{v['positions']} token positions (tolerance {v['tolerance']:.3g} = {v['rtol']:g} x max |logit|)",
        "",
        "## How to load",
        "",
        "```python",
    ]
    if v["fold_error_rounding_units"] is not None:
        fold = f"- fold check: every merged weight within {v['fold_error_rounding_units']:.2f}x the rounding bound"
        lines.insert(lines.index("## How to load") - 1, fold + " of the exact W + s*B@A")
    if variant == "lora":
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("PATH", dtype="auto")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        ]
    else:
        lines += ["from perft_cli.merge import load_merged", 'model, tokenizer = load_merged("PATH")']
    lines += ["```", "", f"PATH is this directory (written as `{result['out']}`).", ""]
    if variant != "lora":
        lines += [
            "The PERFT experts run from forward hooks beside each MoE block (`pip install perft-cli`). Evaluate with",
            "`perft eval --ckpt PATH`. Files: `model.safetensors` (the base), `adapter.safetensors`, `recipe.yaml`.",
            "",
        ]
    if result.get("eval"):
        lines += ["## Evaluation results (from the training run)", ""]
        for ev in result["eval"]:
            res = ev["results"] if isinstance(ev["results"], dict) else {}
            what = "adapted" if res.get("adapted", True) else "frozen base"
            lines += [f"`{ev['file']}` ({what}, checkpoint `{res.get('checkpoint')}`)", ""]
            lines += ["| task | accuracy | examples |", "|---|---|---|"]
            lines += [f"| {t} | {acc} | {n} |" for t, acc, n in _eval_rows(res)] + [""]
    lines += ["## Training recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    return "\n".join(lines)


def print_merge(result: dict[str, Any]) -> None:
    """What was folded or exported, the verification, and how to load the output."""
    from rich.markup import escape

    from perft_cli.console import out

    v = result["verification"]
    what = "merged" if result["folded"] else "exported"
    out.print(f"[bold]{what}[/] {escape(result['checkpoint'])} -> {escape(result['out'])}")
    out.print(f"  {escape(result['action'])}")
    for note in result["notes"]:
        out.print(f"  [yellow]note:[/] {escape(note)}")
    out.print(
        f"  verified: max |logit diff| {v['max_abs_logit_diff']:.3g} <= tolerance {v['tolerance']:.3g} "
        f"({result['dtype']}: {v['rtol']:g} x max |logit| {v['max_abs_logit']:.3g}; mean |diff| "
        f"{v['mean_abs_logit_diff']:.2g} over {v['positions']} positions)"
    )
    if v["fold_error_rounding_units"] is not None:
        out.print(
            f"  fold check: every merged weight within {v['fold_error_rounding_units']:.2f}x the {result['dtype']} "
            f"rounding bound of the exact W + s*B@A; saved vs folded in memory: max |logit diff| "
            f"{v['roundtrip_max_abs_diff']:.3g}"
        )
    if result["folded"]:
        out.print(f"  load: AutoModelForCausalLM.from_pretrained({escape(repr(result['out']))})")
    else:
        out.print(
            f"  load: from perft_cli.merge import load_merged; model, tok = load_merged({escape(repr(result['out']))})"
            f"  or  perft eval --ckpt {escape(result['out'])}"
        )
