"""``perft merge``: ship what was trained as one self-contained, verified model directory.

- LoRA baseline: the LoRA weights are folded into the frozen q/v projections (peft's ``merge`` on each LoraLayer,
  then unwrapped to the plain Linear) and saved as a standard transformers checkpoint: ``from_pretrained(OUT)``
  loads it with no adapter code. ``--format peft`` writes a standard peft adapter folder instead.
- PERFT variants: routed (perft-r, perft-e) or always-on (perft-d, perft-s) PEFT experts sit beside the MoE block
  and read its input, so they cannot be folded into the frozen weights (a routed expert is not a fixed weight
  delta, and the parallel form is non-linear). The export (merging/export.py) is a folder that
  ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` loads with transformers alone: its own model
  type, perft's ``merging/remote_modeling.py`` shipped as ``modeling_perft.py``, the base weights and the adapter
  weights. Without remote code it refuses to load (never the base without its adapters). perft itself reads it with
  its own code (``OUT/base`` and ``recipe.yaml``): ``perft eval --ckpt OUT`` and ``load_merged(OUT)``.
  ``--collapse`` ships PERFT-D's N lora experts as one of rank N*r (exact).

A base trained in 4-bit (``model.quantization: nf4``) is exported unquantized (``--dtype``, default the recipe's):
the original checkpoint's weights exactly; the adapters were trained against their 4-bit reconstruction.

Every merge verifies itself: the unmerged model (in the export dtype) and the written directory, reloaded the way
perft loads it, run the same fixed prompts, and the largest absolute logit difference must stay within
``RTOL[dtype]`` times the largest absolute logit. A PERFT export is also loaded by plain transformers in a child
process where perft_cli cannot be imported (merging/isolated.py) and must match too, and must refuse to load
without ``trust_remote_code``. Nothing is left at ``--out`` on failure (the directory is built beside it and
renamed at the end); files get the usual permissions (0666 minus the umask).

This module holds the command (``run_merge``), the atomic write of ``--out`` and ``load_merged``; the pieces are in
``merging/`` (fold, export, isolated, verification, card).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perft_cli.checkpoint import (
    MERGE_FILE,
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
    """Load a ``perft merge`` output: ``model, tokenizer = load_merged("OUT")`` (model in eval mode).

    perft reads a PERFT export with its own code (the plain base model in ``OUT/base`` and its PERFT core), never
    with the ``modeling_perft.py`` shipped inside; a ``--format peft`` folder loads on the base it names.
    """
    return _load_output(Path(path), single_device=False)


def _load_output(path: Path, single_device: bool, dtype: str | None = None) -> tuple[Any, Any]:
    from perft_cli.modeling import load_trained

    if is_checkpoint(path):  # PERFT export: base/ + adapter.safetensors + recipe.yaml
        recipe = load_checkpoint_recipe(path)
        if single_device:
            recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"device_map": None})})
        model, tokenizer, *_ = load_trained(path, recipe=recipe)
        return model, tokenizer
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _load_peft_folder(path, dtype)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{str(path)!r} is not a perft merge output (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", use_safetensors=True)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _load_peft_folder(path: Path, dtype: str | None) -> tuple[Any, Any]:
    """A ``--format peft`` output on the base model its adapter_config.json names (plain transformers + peft)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from perft_cli.modeling import DTYPES

    if dtype is None:
        try:
            dtype = json.loads((path / MERGE_FILE).read_text()).get("dtype")
        except (OSError, ValueError):
            dtype = None
    base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise CheckpointError(f"{path / 'adapter_config.json'} names no base_model_name_or_path")
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=DTYPES.get(dtype or "", "auto"), use_safetensors=True)
    model = PeftModel.from_pretrained(base, str(path))
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


FORMATS = ("model", "peft")
DTYPE_NAMES = ("bfloat16", "float16", "float32")


def _check_options(recipe: Any, dtype: str, fmt: str, collapse: bool) -> None:
    """Option mistakes in one line, before the model loads."""
    variant = recipe.adapter.variant
    if dtype not in DTYPE_NAMES:
        raise PerftError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_NAMES)}")
    if fmt not in FORMATS:
        raise PerftError(f"--format {fmt!r}: expected 'model' (the default) or 'peft' (the LoRA baseline only)")
    if fmt == "peft" and variant != "lora":
        raise PerftError(
            f"--format peft writes a peft LoRA adapter folder; this run is {variant}, which peft cannot express "
            "(drop --format: the export loads with transformers and trust_remote_code=True)"
        )
    if collapse:
        from perft_cli.merging.export import check_collapse

        check_collapse(recipe.adapter)


def run_merge(
    ckpt: Path,
    out: Path,
    force: bool = False,
    dtype: str | None = None,
    fmt: str = "model",
    collapse: bool = False,
    verify_isolated: bool = True,
) -> dict[str, Any]:
    """Merge (LoRA) or export (PERFT), verify against the unmerged model, write OUT atomically, print a summary.

    ``dtype``: the exported base's dtype (default: the recipe's); ``fmt="peft"``: the LoRA baseline as a peft adapter
    folder; ``collapse``: PERFT-D (lora form) as one always-on expert of rank N*r. ``verify_isolated`` loads a PERFT
    export with plain transformers in a perft-free child process (tests that check many exports at once in one
    child turn it off here).
    """
    from perft_cli.console import info

    check_ckpt_arg(ckpt, "merge")  # a file, an earlier merge's output: say so (not "has the run saved yet?")
    path = resolve_checkpoint(ckpt)
    out = Path(out).expanduser()
    _check_out(out, path, force)
    recipe = load_checkpoint_recipe(path)
    variant, trained_dtype = recipe.adapter.variant, recipe.model.dtype
    dtype = dtype or trained_dtype
    _check_options(recipe, dtype, fmt, collapse)
    # Unquantized, on one device, in the export dtype: the reference and the reloaded output then run the very same
    # arithmetic, and the export is checked in the dtype it is written in.
    model_cfg = recipe.model.model_copy(update={"quantization": "none", "device_map": None, "dtype": dtype})
    base = recipe.model_copy(update={"model": model_cfg})
    notes = []
    if recipe.model.quantization != "none":
        notes.append(
            f"the run trained on a {recipe.model.quantization} (4-bit) base; the base is exported unquantized in "
            f"{dtype}, exactly the original weights (the adapters saw their 4-bit reconstruction in training)"
        )
    if dtype != trained_dtype:
        notes.append(
            f"the base is exported in {dtype} (trained in {trained_dtype}); verified against the run in {dtype}"
        )
    from perft_cli.merging import export
    from perft_cli.merging.verification import sample_logits, verify  # torch: once the arguments are known right
    from perft_cli.modeling import check_trained_weights, load_trained

    weights = check_trained_weights(path, base)  # a damaged adapter file is one line, before the progress line
    info(f"loading {recipe.model.name_or_path} ({dtype}) and the {variant} adapter from {path}")
    model, tokenizer, _, family, _ = load_trained(path, recipe=base, weights=weights)  # in eval mode
    reference = sample_logits(model, tokenizer)  # [P, V] the unmerged model

    tmp = out.parent / f".{out.name}.merging-{os.getpid()}"  # not ".tmp*": is_checkpoint must accept it
    shutil.rmtree(tmp, ignore_errors=True)
    created = create_parents(out, "choose another --out")
    done = False
    try:
        tmp.mkdir()
        action, in_memory, fold_error, written = _fold_or_export(model, tokenizer, base, tmp, fmt, collapse)
        tokenizer.save_pretrained(tmp)
        big = sum(p.numel() for p in model.parameters()) > 10**8
        del model
        if big:  # free the first copy before loading the output (a full collection costs ~0.3 s, only worth it here)
            gc.collect()
        folded = variant == "lora" and fmt == "model"
        merged, merged_tok = _load_output(tmp, single_device=True, dtype=dtype)
        if folded and any("lora_" in n for n, _ in merged.named_parameters()):
            raise PerftError("the merged model still has lora_ parameters")
        got = sample_logits(merged, merged_tok)  # [P, V] the output, loaded the way perft loads it
        del merged
        verification = verify(reference, got, in_memory, dtype, folded=folded)
        verification["fold_error_rounding_units"] = fold_error
        verification["isolated"] = None
        if variant != "lora" and verify_isolated and verification["passed"]:
            verification["isolated"] = _verify_isolated(tmp, reference, tokenizer, dtype)
            if not verification["isolated"]["passed"]:
                verification["passed"], verification["failure"] = False, verification["isolated"]["failure"]
        result = {
            "checkpoint": str(path),
            "out": str(out),
            "variant": variant,
            "expert_form": recipe.adapter.expert if variant != "lora" else None,
            "dtype": dtype,
            "format": fmt,
            "folded": folded,
            "collapsed": collapse,
            "action": action,
            "files": written,
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
        export.normal_permissions(tmp)
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


def _verify_isolated(tmp: Path, reference: torch.Tensor, tokenizer: Any, dtype: str) -> dict[str, Any]:
    """The export loaded by plain transformers (trust_remote_code) in a child where perft_cli cannot be imported."""
    from perft_cli.merging.isolated import check_isolated, isolated_logits
    from perft_cli.merging.verification import SAMPLE_TOKENS, sample_inputs, sample_texts

    (res,) = isolated_logits([tmp], sample_texts(), SAMPLE_TOKENS)
    return check_isolated(res, reference, sample_inputs(tokenizer)["input_ids"], isolated_rtol(dtype))


def isolated_rtol(dtype: str) -> float:
    """The shipped modeling file computes every PEFT expert densely; perft's core may take the grouped path, so the
    float32 sums differ in order: 1e-4 relative in float32, 1e-3 in half precision (a rounding of the adapter output
    to bf16 can move by one unit)."""
    from perft_cli.merging.verification import RTOL

    return RTOL["float32"] if dtype == "float32" else 1e-3


def _fold_or_export(
    model: Any, tokenizer: Any, recipe: Any, tmp: Path, fmt: str = "model", collapse: bool = False
) -> tuple[str, torch.Tensor | None, float | None, dict[str, int]]:
    """Write the model files into ``tmp``. Returns (what was done, folded logits or None, fold error, file sizes)."""
    from perft_cli.adapters import adapter_state, detach_adapter
    from perft_cli.merging import export, fold
    from perft_cli.merging.verification import sample_logits

    variant, dtype = recipe.adapter.variant, recipe.model.dtype
    if variant == "lora" and fmt == "peft":
        n = export.write_peft_adapter(model, recipe, adapter_state(model, variant), tmp)
        action = (
            f"wrote the LoRA weights ({n:,} parameters) as a peft adapter folder for the base "
            f"{recipe.model.name_or_path}; load it with peft.PeftModel.from_pretrained(base_model, OUT)"
        )
        return action, None, None, {export.PEFT_WEIGHTS: (tmp / export.PEFT_WEIGHTS).stat().st_size}
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
        sizes = {p.name: p.stat().st_size for p in tmp.glob("*.safetensors")}
        return action, in_memory, fold_error, sizes
    exported = adapter_state(model, variant)
    detach_adapter(model, variant)
    shipped = recipe
    if collapse:
        exported, collapsed = export.collapse_dense(exported, recipe.adapter)
        shipped = recipe.model_copy(update={"adapter": collapsed})
    sizes = export.write_perft_export(model, tokenizer, shipped, exported, tmp)
    n = sum(t.numel() for t in exported.values())
    how = (
        f"collapsed the {recipe.adapter.num_experts} always-on lora experts into one of rank {shipped.adapter.rank} "
        "(exact: a sum of linear maps); "
        if collapse
        else ""
    )
    action = (
        f"{how}{variant} experts ({recipe.adapter.expert} form) run beside each MoE block from its input and cannot "
        f"be folded into the frozen weights; exported the base ({dtype}, {export.WEIGHTS_FILE}), the adapters "
        f"(adapter.safetensors, {n:,} parameters) and {export.MODELING_FILE}: the folder loads with "
        "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)"
    )
    return action, None, None, sizes


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
