"""What ``perft merge`` writes: the PERFT export that plain transformers loads with ``trust_remote_code``, and the
LoRA baseline as a standard peft adapter folder (``--format peft``).

A PERFT export (every variant, both expert forms)::

    OUT/
      config.json                 model_type "perft_moe", auto_map -> modeling_perft.py; the base config as
                                  ``text_config``, the adapter's shape as ``perft``
      modeling_perft.py           perft_cli/merging/remote_modeling.py, byte for byte (torch + transformers only)
      model-base.safetensors      the base weights, under the base model's own names, in the export dtype
      adapter.safetensors         the PERFT weights (float32), ``model.layers.<i>.mlp.perft_adapter...``
      model.safetensors.index.json   both files, so ``from_pretrained(OUT, trust_remote_code=True)`` reads both
      generation_config.json, tokenizer files
      base/                       config.json of the base family + an index into ../model-base.safetensors + the
                                  tokenizer: what perft's own loader reads (``recipe.yaml`` names it), with no
                                  remote code; perft never runs the shipped modeling file
      recipe.yaml                 model.name_or_path ``base``: ``perft eval --ckpt OUT`` and ``load_merged(OUT)``

The folder's own model type and architecture make ``from_pretrained(OUT)`` without ``trust_remote_code`` refuse with
transformers' own message about custom code, instead of loading the base model without its adapters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from perft_cli.checkpoint import ADAPTER_FILE, RECIPE_FILE
from perft_cli.errors import PerftError

REMOTE_SOURCE = Path(__file__).with_name("remote_modeling.py")
MODELING_FILE = "modeling_perft.py"
MODEL_TYPE = "perft_moe"
ARCHITECTURE = "PerftMoeForCausalLM"
BASE_DIR = "base"
WEIGHTS_FILE = "model-base.safetensors"  # not model.safetensors: transformers would read it alone, not the index
INDEX_FILE = "model.safetensors.index.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def perft_spec(adapter: Any, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``perft`` section of config.json: what remote_modeling.PerftAdapter needs, from the recipe's adapter."""
    scale = adapter.lora_alpha / adapter.rank
    return {
        "variant": adapter.variant,
        "expert_form": adapter.expert,
        "top_k": adapter.top_k,
        "scale": scale if adapter.expert == "lora" else 1.0,  # the parallel form has no scale
        "renormalize": adapter.renormalize,
        "scale_by_base_router": adapter.scale_by_base_router,
        "blocks": blocks,
    }


def adapted_blocks(model: Any, exported: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Every adapted MoE block by module name, with its router's name and the adapter's N, D and r.

    Read from perft's own discovery (arch.find_moe_blocks) and the adapter tensors, so the shipped modeling file
    needs no table of families: it adds an adapter where perft had one.
    """
    from perft_cli.arch import find_moe_blocks

    names = {id(m): n for n, m in model.named_modules()}
    blocks = []
    for ref in find_moe_blocks(model):
        a = exported.get(f"{ref.name}.perft_adapter.experts.perft_A")  # [N, D, r]
        if a is None:
            raise PerftError(
                f"no adapter weights for the MoE block {ref.name}; the checkpoint does not match the model"
            )
        n, d, r = a.shape
        blocks.append({"block": ref.name, "router": names[id(ref.router)], "experts": n, "hidden_size": d, "rank": r})
    return blocks


def check_collapse(adapter: Any) -> None:
    """``--collapse`` is exact only for PERFT-D (and -S) in the lora form: a sum of linear maps is one linear map."""
    if adapter.variant not in ("perft-d", "perft-s") or adapter.expert != "lora":
        raise PerftError(
            f"--collapse folds PERFT-D's N always-on lora experts into one of rank N*r; this run is {adapter.variant} "
            f"with {adapter.expert} experts, which does not collapse exactly (drop --collapse)"
        )


def collapse_dense(state: dict[str, torch.Tensor], adapter: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """PERFT-D lora: sum_j s B_j A_j h = s [B_1..B_N] [A_1; ..; A_N] h, one always-on expert of rank N*r (exact).

    Returns the new state (same names, shapes [1, D, N*r] and [1, N*r, D]) and the adapter section of a perft-s
    recipe with rank N*r and alpha = s * N*r (so its scale alpha / rank is still s).
    """
    out = {}
    for name, t in state.items():
        N, a, b = t.shape
        if name.endswith("perft_A"):  # [N, D, r] -> [1, D, N*r]
            out[name] = t.permute(1, 0, 2).reshape(1, a, N * b).contiguous()
        elif name.endswith("perft_B"):  # [N, r, D] -> [1, N*r, D]
            out[name] = t.reshape(1, N * a, b).contiguous()
        else:
            raise PerftError(f"cannot collapse the adapter weight {name}")
    n = 1 if adapter.variant == "perft-s" else adapter.num_experts
    scale = adapter.lora_alpha / adapter.rank
    rank = n * adapter.rank
    collapsed = adapter.model_copy(
        update={"variant": "perft-s", "num_experts": 1, "rank": rank, "alpha": scale * rank}
    )
    return out, collapsed


def write_perft_export(
    model: Any, tokenizer: Any, recipe: Any, exported: dict[str, torch.Tensor], tmp: Path
) -> dict[str, Any]:
    """Write the export of a base ``model`` (adapters detached) and its adapter weights. Returns file sizes."""
    from safetensors.torch import save_file

    base_state = _base_state(model)
    clash = sorted(set(base_state) & set(exported))
    if clash:
        raise PerftError(f"adapter weights share names with the base: {clash[:3]}")
    meta = {"format": "pt", "producer": "perft merge"}
    save_file(base_state, str(tmp / WEIGHTS_FILE), metadata=meta)
    save_file(exported, str(tmp / ADAPTER_FILE), metadata=meta)
    sizes = {f: (tmp / f).stat().st_size for f in (WEIGHTS_FILE, ADAPTER_FILE)}
    weight_map = {**dict.fromkeys(base_state, WEIGHTS_FILE), **dict.fromkeys(exported, ADAPTER_FILE)}
    _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    shutil.copyfile(REMOTE_SOURCE, tmp / MODELING_FILE)
    _write_json(tmp / "config.json", _export_config(model.config, recipe, adapted_blocks(model, exported)))
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # base/: a plain model folder of the base family over the same bytes, for perft's own loader (no remote code).
    base = tmp / BASE_DIR
    base.mkdir()
    model.config.save_pretrained(base)
    model.generation_config.save_pretrained(base)
    tokenizer.save_pretrained(base)
    index = {
        "metadata": {"total_size": sizes[WEIGHTS_FILE]},
        "weight_map": dict.fromkeys(base_state, f"../{WEIGHTS_FILE}"),
    }
    _write_json(base / INDEX_FILE, index)
    m = recipe.model.model_copy(update={"name_or_path": BASE_DIR, "quantization": "none", "device_map": None})
    header = (
        f"# Written by perft merge. model.name_or_path '{BASE_DIR}' is the base model inside this directory "
        "(resolved against it on load).\n"
    )
    (tmp / RECIPE_FILE).write_text(header + recipe.model_copy(update={"model": m}).to_yaml())
    return sizes


def _base_state(model: Any) -> dict[str, torch.Tensor]:
    """The base's tensors by name, tied copies left out (transformers ties them again on load, as save_pretrained)."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        if name in tied:
            continue
        t = t.detach().to("cpu")
        t = t.clone() if t.untyped_storage().data_ptr() in seen else t.contiguous()  # safetensors: no shared storage
        seen.add(t.untyped_storage().data_ptr())
        state[name] = t
    return state


def _export_config(base_config: Any, recipe: Any, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    import transformers

    text = base_config.to_dict()
    return {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "auto_map": {
            "AutoConfig": f"{MODELING_FILE[:-3]}.PerftMoeConfig",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{ARCHITECTURE}",
        },
        "perft": perft_spec(recipe.adapter, blocks),
        "text_config": text,
        "dtype": text.get("dtype"),
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
        "transformers_version": transformers.__version__,
    }


def write_peft_adapter(model: Any, recipe: Any, lora_state: dict[str, torch.Tensor], tmp: Path) -> int:
    """A standard peft LoRA folder (adapter_config.json, adapter_model.safetensors) for the run's base model.

    perft injects LoRA with peft's ``inject_adapter_in_model`` (no PeftModel wrapper): its names are
    ``model.layers.0.self_attn.q_proj.lora_A.default.weight``; peft saves ``base_model.model.<name>`` without the
    adapter name. Returns the number of LoRA parameters.
    """
    from safetensors.torch import save_file

    from perft_cli.adapters import lora_config, matching_targets
    from perft_cli.arch import family_for

    a = recipe.adapter
    wanted = a.target_modules or list(family_for(model.config.model_type).lora_targets)
    wrapped = {n.split(".lora_")[0] for n in lora_state}  # the modules that carry LoRA weights
    config = lora_config(
        a, matching_targets(wanted, wrapped), task_type="CAUSAL_LM", base_model_name_or_path=recipe.model.name_or_path
    )
    config.save_pretrained(str(tmp))
    state = {"base_model.model." + n.replace(".default.", "."): t.contiguous() for n, t in lora_state.items()}
    save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt", "producer": "perft merge"})
    return sum(t.numel() for t in state.values())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def normal_permissions(root: Path) -> None:
    """Files 0666 and folders 0777 minus the umask, as ``open()`` and ``save_pretrained`` leave them.

    Some writers (temporary files renamed into place) create files readable by their owner only (0600).
    """
    import os

    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
