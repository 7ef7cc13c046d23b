"""What a merge tells its user: the README.md model card written into the output and the terminal summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
    peft_folder = result.get("format") == "peft"
    library = "peft" if peft_folder else "transformers"
    tags = "tags: [perft, moe]" if variant == "lora" else "tags: [perft, moe, custom_code]"
    front = ["---", f"library_name: {library}", tags]
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
    if peft_folder:
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="{result["dtype"]}")',
            'model = PeftModel.from_pretrained(base, "PATH")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        ]
    elif variant == "lora":
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("PATH", dtype="auto")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
            'tokenizer = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)  # it reads config.json too',
        ]
    lines += ["```", "", f"PATH is this directory (written as `{result['out']}`).", ""]
    if variant != "lora":
        iso = v.get("isolated") or {}
        checked = (
            f" Checked by perft merge in a Python process where perft cannot be imported: max |logit difference| "
            f"{iso['max_abs_logit_diff']:.3g} to the unmerged model."
            if iso.get("passed")
            else ""
        )
        lines += [
            "The PERFT experts run beside each MoE block from its input; they cannot be folded into the base",
            "weights. `trust_remote_code=True` runs `modeling_perft.py` from this folder (torch and transformers",
            "only, a short file: read it first). Without it, transformers refuses to load the folder (its model type",
            "`perft_moe` is not a transformers model): the base is never loaded silently without its adapters."
            + checked,
            "",
            "Files: `model-base.safetensors` (the base, its own parameter names), `adapter.safetensors` (the",
            "PERFT weights, float32), `config.json` (`text_config`: the base config; `perft`: the adapter), `base/`",
            "(the base config for perft's own loader), `recipe.yaml`. With perft installed: `perft eval --ckpt PATH`",
            "or `from perft_cli.merge import load_merged` (perft's own code, not the shipped file).",
            "",
            "Serving: vLLM's Transformers backend (`vllm serve PATH --trust-remote-code --model-impl",
            "transformers`) and SGLang load custom-code folders of this kind; neither was tried with this export.",
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
    iso = v.get("isolated")
    if iso:
        out.print(
            f"  plain transformers (perft not importable): max |logit diff| {iso['max_abs_logit_diff']:.3g} <= "
            f"{iso['tolerance']:.3g}; without trust_remote_code it refuses to load"
        )
    if result.get("format") == "peft":
        out.print(f"  load: PeftModel.from_pretrained(base_model, {escape(repr(result['out']))})")
    elif result["folded"]:
        out.print(f"  load: AutoModelForCausalLM.from_pretrained({escape(repr(result['out']))})")
    else:
        out.print(
            f"  load: AutoModelForCausalLM.from_pretrained({escape(repr(result['out']))}, trust_remote_code=True)"
        )
        out.print(
            f"  with perft: perft eval --ckpt {escape(result['out'])}  or  "
            f"load_merged({escape(repr(result['out']))}) (perft's own loader)"
        )
