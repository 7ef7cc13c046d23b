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

This module holds the command (``run_merge``), the atomic write of ``--out`` and ``load_merged``; the fold is in
``lora_fold``, the check in ``merge_verification``, the model card and terminal summary in ``merge_report``.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perft_cli.checkpoint import (
    ADAPTER_FILE,
    MERGE_FILE,
    RECIPE_FILE,
    check_ckpt_arg,
    is_checkpoint,
    load_checkpoint_recipe,
    resolve_checkpoint,
    run_dir_of,
)
from perft_cli.errors import CheckpointError, PerftError
from perft_cli.merging.card import model_card, print_merge
from perft_cli.outputs import check_output_parent, create_parents, remove_empty

if TYPE_CHECKING:  # torch and transformers are imported once the arguments are known to be right
    import torch


def load_merged(path: str | Path) -> tuple[Any, Any]:
    """Load a ``perft merge`` output: ``model, tokenizer = load_merged("OUT")`` (model in eval mode)."""
    return _load_output(Path(path), single_device=False)


def _load_output(path: Path, single_device: bool) -> tuple[Any, Any]:
    from perft_cli.modeling import load_trained

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
    # Before the model loads: a parent that is a file (afile.txt/sub) or a folder that cannot be written in.
    check_output_parent(out, "--out", "choose another directory")


def run_merge(ckpt: Path, out: Path, force: bool = False) -> dict[str, Any]:
    """Merge (LoRA) or export (PERFT), verify against the unmerged model, write OUT atomically, print a summary."""
    from perft_cli.console import info

    check_ckpt_arg(ckpt, "merge")  # a file, an earlier merge's output: say so (not "has the run saved yet?")
    path = resolve_checkpoint(ckpt)
    out = Path(out).expanduser()
    _check_out(out, path, force)
    recipe = load_checkpoint_recipe(path)
    variant, dtype = recipe.adapter.variant, recipe.model.dtype
    # Unquantized, on one device: the reference and the reloaded output then run the very same arithmetic.
    base = recipe.model_copy(
        update={"model": recipe.model.model_copy(update={"quantization": "none", "device_map": None})}
    )
    notes = []
    if recipe.model.quantization != "none":
        notes.append(
            f"the run trained on a {recipe.model.quantization} (4-bit) base; the base is exported unquantized in "
            f"{dtype}, exactly the original weights (the adapters saw their 4-bit reconstruction in training)"
        )
    from perft_cli.merging.verification import sample_logits, verify  # torch: once the arguments are known right
    from perft_cli.modeling import load_trained

    info(f"loading {recipe.model.name_or_path} ({dtype}) and the {variant} adapter from {path}")
    model, tokenizer, _, family, _ = load_trained(path, recipe=base)  # in eval mode
    reference = sample_logits(model, tokenizer)  # [P, V] the unmerged model

    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"  # not ".tmp*": is_checkpoint must accept it
    shutil.rmtree(tmp, ignore_errors=True)
    created = create_parents(out, "choose another --out")
    done = False
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
        verification = verify(reference, got, in_memory, dtype, folded=variant == "lora")
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
        result["eval"] = _copy_evals(run_dir_of(path) or Path(ckpt), tmp)
        (tmp / MERGE_FILE).write_text(json.dumps(result, indent=2))
        (tmp / "README.md").write_text(model_card(recipe, result, family.display))
        if out.exists():
            shutil.rmtree(out)  # empty, or --force
        os.replace(tmp, out)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done:
            remove_empty(created)  # the parents made for --out, if nothing else went there
    print_merge(result)
    return result


def _fold_or_export(
    model: Any, tokenizer: Any, recipe: Any, tmp: Path
) -> tuple[str, torch.Tensor | None, float | None]:
    """Write the model files into ``tmp``. Returns (what was done, folded model's logits or None, fold error)."""
    from perft_cli.adapters import adapter_state, detach_adapter
    from perft_cli.merging import fold
    from perft_cli.merging.verification import sample_logits

    variant, dtype = recipe.adapter.variant, recipe.model.dtype
    if variant == "lora":
        folded, fold_error = fold.fold_lora(model)
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


def _write_perft_files(tmp: Path, recipe: Any, exported: dict[str, torch.Tensor]) -> None:
    """adapter.safetensors and a recipe.yaml naming the directory itself (``.``) as the unquantized base."""
    from safetensors.torch import save_file

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
