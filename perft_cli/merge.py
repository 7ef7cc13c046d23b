"""``perft merge``: ship what was trained as one self-contained, verified model directory.

- LoRA baseline: the LoRA weights are folded into the frozen q/v projections (peft's ``merge`` on each LoraLayer,
  then unwrapped to the plain Linear) and saved as a standard transformers checkpoint: ``from_pretrained(OUT)``
  loads it with no adapter code.
- PERFT variants: routed (perft-r, perft-e) or always-on (perft-d, perft-s) PEFT experts sit beside the MoE block
  and read its input, so they cannot be folded into the frozen weights (a routed expert is not a fixed weight
  delta, and the parallel form is non-linear). They are exported beside the base weights: ``model.safetensors``
  (the base in the recipe's dtype), ``adapter.safetensors`` and a ``recipe.yaml`` whose ``model.name_or_path`` is
  ``.``, so ``perft eval --ckpt OUT`` and ``load_merged(OUT)`` work with no run directory.

A base trained in 4-bit (``model.quantization: nf4``) is exported unquantized in the recipe's dtype: that is the
original checkpoint's weights exactly; the adapters were trained against their 4-bit reconstruction.

Every merge verifies itself: the unmerged model and the written directory, reloaded the way users load it, run the
same fixed prompts, and the largest absolute logit difference must stay within ``RTOL[dtype]`` times the largest
absolute logit. Nothing is left at ``--out`` on failure (the directory is built beside it and renamed at the end).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from perft_cli.errors import CheckpointError, PerftError

# Tolerance on max |logit difference| to the unmerged model, relative to max |logit| over the sample positions.
# float32: only the order of a sum changes (W x + s B A x vs (W + s B A) x); measured <= 1e-6 relative on tiny models
# of every family. bf16 / fp16: the folded weight is stored rounded, and a rounding-sized change can flip a near-tie
# in a router's top-k, which moves that token's logits a lot: measured up to 0.22 relative in bf16 (gpt-oss, tiny
# random model with near-uniform routers), as large as the unmerged model's own bf16-vs-fp32 difference (0.42). So
# in half precision this check only catches gross errors; two exact checks back it: every folded weight against the
# float32 W + s*B@A (fold_lora), and the reloaded output against the folded model in memory (float32 tolerance).
# A PERFT export copies weights unchanged and is held to the float32 tolerance in every dtype (0 measured).
RTOL = {"float32": 1e-4, "float16": 0.25, "bfloat16": 0.5}
SAMPLE_PROMPTS = (
    "Please answer the following question with true or false. Question: is the sky blue on a clear day?",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many clips in all?",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?",
)
SAMPLE_TOKENS = 96  # per prompt: enough to pass every layer's routing through many experts, cheap on a CPU
MERGE_FILE = "perft-merge.json"


def _sample_inputs(tokenizer: Any) -> dict[str, torch.Tensor]:
    from perft_cli.prompts import eval_prompt

    texts = [eval_prompt(SAMPLE_PROMPTS[0], commonsense=True), eval_prompt(SAMPLE_PROMPTS[1]), SAMPLE_PROMPTS[2]]
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=SAMPLE_TOKENS)


@torch.no_grad()
def sample_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    """float32 logits of the fixed sample prompts at their real (non-padding) positions: [P, V]."""
    batch = _sample_inputs(tokenizer)
    device = model.get_input_embeddings().weight.device
    logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits  # [B, S, V]
    return logits.float()[batch["attention_mask"].bool().to(device)].cpu()  # [P, V]


def fold_lora(model: Any) -> tuple[list[str], float]:
    """Merge every peft LoraLayer into its base weight and put the plain base layer back.

    Returns the folded module names and the largest weight error against the exact float32 ``W + s * B @ A``, in
    units of the storage dtype's rounding bound (peft rounds the delta, then the sum: <= u * (|delta| + |W'|) with u
    the unit roundoff). A value <= 1 proves the fold itself exact up to storage rounding, whatever the dtype.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    folded, worst = [], 0.0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)  # [out, in]
        exact = weight.detach().float() + delta  # [out, in]
        module.merge(safe_merge=True)  # safe_merge: checks the merged weight for NaN/inf before writing it
        u = torch.finfo(weight.dtype).eps / 2
        bound = u * (delta.abs() + exact.abs()) + torch.finfo(weight.dtype).tiny
        merged = module.get_base_layer().weight.detach().float()
        worst = max(worst, float(((merged - exact).abs() / bound).max()))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())
        folded.append(name)
    left = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if left:
        raise PerftError(f"cannot fold adapter layers of another kind: {left[:3]}")
    if hasattr(model, "peft_config"):  # set by peft's inject_adapter_in_model; nothing is left to describe
        del model.peft_config
    return folded, worst


def load_merged(path: str | Path) -> tuple[Any, Any]:
    """Load a ``perft merge`` output: ``model, tokenizer = load_merged("OUT")`` (model in eval mode)."""
    return _load_output(Path(path), single_device=False)


def _load_output(path: Path, single_device: bool) -> tuple[Any, Any]:
    from perft_cli.checkpoint import is_checkpoint, load_checkpoint_recipe, load_trained

    if is_checkpoint(path):  # PERFT export: base weights + adapter.safetensors + recipe.yaml
        recipe = load_checkpoint_recipe(path)
        if single_device:
            recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"device_map": None})})
        model, tokenizer, *_ = load_trained(path, recipe=recipe)
        return model, tokenizer
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a perft merge output (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _check_out(out: Path, ckpt: Path, force: bool) -> None:
    out_r, ckpt_r = out.resolve(), ckpt.resolve()
    if out_r == ckpt_r or out_r in ckpt_r.parents:
        raise PerftError(f"--out {str(out)!r} holds the checkpoint being merged; choose another directory")
    if out.exists() and not out.is_dir():
        raise PerftError(f"--out {str(out)!r} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PerftError(f"--out {str(out)!r} is not empty; pass --force to replace it")


def _run_dir(ckpt_arg: Path, ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (RUN/checkpoints/step-N), else the checkpoint itself."""
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent
    return Path(ckpt_arg)


def run_merge(ckpt: Path, out: Path, force: bool = False) -> dict[str, Any]:
    """Merge (LoRA) or export (PERFT), verify against the unmerged model, write OUT atomically, print a summary."""
    from perft_cli.adapters import attach_adapter, load_adapter_state
    from perft_cli.checkpoint import load_adapter_weights, load_checkpoint_recipe, resolve_checkpoint
    from perft_cli.console import info
    from perft_cli.modeling import load_model, load_tokenizer

    path = resolve_checkpoint(ckpt)
    out = Path(out)
    _check_out(out, path, force)
    recipe = load_checkpoint_recipe(path)
    variant, dtype = recipe.adapter.variant, recipe.model.dtype
    # Unquantized, on one device: the reference and the reloaded output then run the very same arithmetic.
    base_cfg = recipe.model.model_copy(update={"quantization": "none", "device_map": None})
    notes = []
    if recipe.model.quantization != "none":
        notes.append(
            f"the run trained on a {recipe.model.quantization} (4-bit) base; the base is exported unquantized in "
            f"{dtype}, exactly the original weights (the adapters saw their 4-bit reconstruction in training)"
        )
    info(f"loading {recipe.model.name_or_path} ({dtype}) and the {variant} adapter from {path}")
    model, family = load_model(base_cfg)
    tokenizer = load_tokenizer(base_cfg)
    attach_adapter(model, recipe.adapter, family)
    load_adapter_state(model, variant, load_adapter_weights(path))
    model.eval()
    reference = sample_logits(model, tokenizer)  # [P, V] the unmerged model

    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"  # not ".tmp*": is_checkpoint must accept it
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        action, in_memory, fold_error = _fold_or_export(model, tokenizer, recipe, tmp)
        tokenizer.save_pretrained(tmp)
        big = sum(p.numel() for p in model.parameters()) > 10**8
        del model
        if big:  # free the first copy before loading the output (a full collection costs ~0.3 s, only worth it here)
            gc.collect()
        merged, merged_tok = _load_output(tmp, single_device=True)
        if variant == "lora" and any("lora_" in n for n, _ in merged.named_parameters()):
            raise PerftError("the merged model still has lora_ parameters")
        got = sample_logits(merged, merged_tok)  # [P, V] the output, loaded the way users load it
        del merged
        verification = _verify(reference, got, in_memory, dtype, folded=variant == "lora")
        verification["fold_error_rounding_units"] = fold_error
        result = {
            "checkpoint": str(path),
            "out": str(out),
            "variant": variant,
            "expert_form": recipe.adapter.expert if variant != "lora" else None,
            "dtype": dtype,
            "folded": variant == "lora",
            "action": action,
            "notes": notes,
            "verification": verification,
        }
        if not verification["passed"]:
            raise PerftError(f"merge verification failed: {verification['failure']}; nothing was written to {out}")
        pickles = [p.name for p in tmp.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        if pickles:
            raise PerftError(f"refusing to ship pickle files {pickles}; only safetensors are allowed")
        result["eval"] = _copy_evals(_run_dir(ckpt, path), tmp)
        (tmp / MERGE_FILE).write_text(json.dumps(result, indent=2))
        (tmp / "README.md").write_text(model_card(recipe, result, family.display))
        if out.exists():
            shutil.rmtree(out)  # empty, or --force
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_merge(result)
    return result


def _fold_or_export(
    model: Any, tokenizer: Any, recipe: Any, tmp: Path
) -> tuple[str, torch.Tensor | None, float | None]:
    """Write the model files into ``tmp``. Returns (what was done, folded model's logits or None, fold error)."""
    from perft_cli.adapters import adapter_state, detach_adapter

    variant, dtype = recipe.adapter.variant, recipe.model.dtype
    if variant == "lora":
        folded, fold_error = fold_lora(model)
        if fold_error > 1.0:
            raise PerftError(f"the LoRA fold is off by {fold_error:.3g}x the {dtype} rounding bound; not writing")
        in_memory = sample_logits(model, tokenizer)
        model.save_pretrained(tmp)  # transformers 5 writes safetensors only
        kinds = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in folded}))
        action = (
            f"folded the LoRA weights of {len(folded)} layers ({kinds}) into the base weights; "
            "the output is a plain transformers model with no adapter modules"
        )
        return action, in_memory, fold_error
    exported = adapter_state(model, variant)
    detach_adapter(model, variant)
    model.save_pretrained(tmp)
    _write_perft_files(tmp, recipe, exported)
    action = (
        f"{variant} experts ({recipe.adapter.expert} form) run beside each MoE block from its input and cannot be "
        f"folded into the frozen weights; exported the base weights, adapter.safetensors "
        f"({sum(t.numel() for t in exported.values()):,} parameters) and a recipe.yaml pointing at '.'"
    )
    return action, None, None


def _verify(
    reference: torch.Tensor, got: torch.Tensor, in_memory: torch.Tensor | None, dtype: str, folded: bool
) -> dict[str, Any]:
    """Compare the output's logits with the unmerged model's (and, after a fold, with the folded model in memory)."""
    scale = float(reference.abs().max().clamp_min(1e-6))
    if got.shape != reference.shape:
        return {"passed": False, "failure": f"the output gives logits of shape {tuple(got.shape)}"}
    diff = (got - reference).abs()  # [P, V]
    # An export copies weights unchanged: it must match as tightly as float32 in any dtype (0 measured).
    rtol = RTOL[dtype] if folded else RTOL["float32"]
    result = {
        "prompts": len(SAMPLE_PROMPTS),
        "positions": int(reference.shape[0]),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": scale,
        "rtol": rtol,
        "tolerance": rtol * scale,
        "roundtrip_max_abs_diff": None,
    }
    failure = None
    if not result["max_abs_logit_diff"] <= result["tolerance"]:
        failure = (
            f"max |logit difference| {result['max_abs_logit_diff']:.3g} to the unmerged model exceeds the "
            f"tolerance {result['tolerance']:.3g} ({dtype})"
        )
    if in_memory is not None:
        # Save and reload must not change anything: exact up to float32 summation order.
        result["roundtrip_max_abs_diff"] = float((got - in_memory).abs().max())
        if not result["roundtrip_max_abs_diff"] <= RTOL["float32"] * scale:
            failure = (
                failure or f"the saved model differs from the folded one by {result['roundtrip_max_abs_diff']:.3g}"
            )
    result["passed"], result["failure"] = failure is None, failure
    return result


def _write_perft_files(tmp: Path, recipe: Any, exported: dict[str, torch.Tensor]) -> None:
    """adapter.safetensors and a recipe.yaml naming the directory itself (``.``) as the unquantized base."""
    from safetensors.torch import save_file

    from perft_cli.checkpoint import ADAPTER_FILE, RECIPE_FILE

    save_file(exported, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "producer": "perft merge"})
    model = recipe.model.model_copy(update={"name_or_path": ".", "quantization": "none"})
    text = recipe.model_copy(update={"model": model}).to_yaml()
    header = "# Written by perft merge. model.name_or_path '.' is this directory (resolved against it on load).\n"
    (tmp / RECIPE_FILE).write_text(header + text)


def _copy_evals(run_dir: Path, tmp: Path) -> list[dict[str, Any]]:
    """The run's eval/*.json results, copied into OUT/eval/ and returned for the model card."""
    found = []
    for f in sorted(Path(run_dir).glob("eval/*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        (tmp / "eval").mkdir(exist_ok=True)
        shutil.copyfile(f, tmp / "eval" / f.name)
        found.append({"file": f"eval/{f.name}", "results": data})
    return found


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
