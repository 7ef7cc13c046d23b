"""Load the frozen MoE backbone and its tokenizer (safetensors only; no remote code unless the recipe allows it), and
a trained checkpoint on top of it (``load_trained``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers import logging as hf_logging

from perft_cli import hub
from perft_cli.arch import EXPERT_COUNT_NAMES, TOP_K_NAMES, MoEFamily, config_int, family_for
from perft_cli.config import ModelConfig, Recipe
from perft_cli.errors import CheckpointError, ModelError

# Our own progress output replaces transformers' per-load weight bars.
hf_logging.disable_progress_bar()

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _looks_local(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _hub_unreachable(cfg: ModelConfig) -> str | None:
    """For a hub id, ``hub.probe`` (one request; offline mode from then on if the network fails); else None."""
    name = cfg.name_or_path
    if Path(name).expanduser().exists() or _looks_local(name):
        return None
    return hub.probe(name, "model", cfg.revision)


def _load_error(what: str, cfg: ModelConfig, e: BaseException) -> ModelError:
    """One line for a failed load; when the hub was found unreachable, says so instead of the cache miss."""
    name, why = cfg.name_or_path, hub.unreachable(cfg.name_or_path)
    if why:
        # The config alone is kilobytes; the whole model can be ~90 GB: say which one the command at hand needs.
        get = (
            f"hf download {name} config.json is all that perft plan and perft validate need, hf download {name} "
            "the whole model for training"
            if not what
            else f"hf download {name}"
        )
        return ModelError(
            f"cannot load {what}{name!r}: the Hugging Face hub cannot be reached ({why}) and it is not in the "
            f"local cache; download it where there is network ({get}) or set model.name_or_path to a local folder"
        )
    return ModelError(f"cannot load {what}{name!r}: {str(e).splitlines()[0]} (no hub access? use a local directory)")


def load_config(cfg: ModelConfig) -> tuple[PretrainedConfig, MoEFamily]:
    """The model's config and MoE family, or a one-line ModelError (missing path, no config, unsupported type)."""
    name = cfg.name_or_path
    path = Path(name).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ModelError(f"model directory {name!r} has no config.json; point model.name_or_path at a model folder")
    if not path.exists() and _looks_local(name):
        raise ModelError(f"model path {name!r} does not exist; check model.name_or_path")
    _hub_unreachable(cfg)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"{name!r} needs custom code from its repository; set model.trust_remote_code: true only if you "
                "trust it"
            ) from None
        model_type = _raw_model_type(path)
        if model_type is not None:
            family_for(model_type)  # raises the "unsupported family" error with the supported list
        raise ModelError(f"cannot read the config of {name!r}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        if path.exists():  # a local folder: its config.json is unreadable, the hub has nothing to do with it
            raise ModelError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from None
        raise _load_error("", cfg, e) from None
    family = family_for(getattr(config, "model_type", None))
    _check_routing(config, name)
    return config, family


def _check_routing(config: PretrainedConfig, name: str) -> None:
    """A config whose top-k exceeds its expert count cannot route: say so now, not as a traceback mid-training."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # a multimodal model's LM
    experts, top_k = config_int(text, EXPERT_COUNT_NAMES), config_int(text, TOP_K_NAMES)
    experts = experts[1] if experts else None
    k_name, k = top_k if top_k else (None, None)
    if isinstance(k, int) and experts is not None and not 1 <= k <= experts:
        raise ModelError(
            f"{name!r}: its config.json routes each token to {k_name}={k} of {experts} experts, which "
            "cannot work; fix the model's config.json"
        )


def _raw_model_type(path: Path) -> str | None:
    import json

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return raw.get("model_type") if isinstance(raw, dict) else None


def load_model(cfg: ModelConfig, shard: bool = False) -> tuple[PreTrainedModel, MoEFamily]:
    """Load the frozen base as the recipe asks: dtype, nf4 (experts included), device map. Weights: safetensors.

    ``shard`` (train.sharding: fsdp, an initialised process group of WORLD_SIZE ranks): a bf16 / fp32 base is loaded
    by transformers' own FSDP2 loader, each rank reading only its shard of every weight, so no rank ever holds the
    whole model; it comes back already sharded (training/sharding.py leaves it so). NF4 loads whole, as before."""
    _, family = load_config(cfg)
    dtype = DTYPES[cfg.dtype]
    from perft_cli.arch import OUTSIDE_INTERFACE

    if cfg.quantization == "nf4":
        from perft_cli.quant import load_model_nf4

        if family.model_type in OUTSIDE_INTERFACE:  # never a "4-bit" run whose experts silently stay bf16
            raise ModelError(
                f"model.quantization: nf4 cannot quantize {family.display}'s routed experts (they bypass "
                "transformers' experts interface, which perft's NF4 path plugs into), so they would stay bf16; set "
                "model.quantization: none"
            )

        with _weight_load_errors(cfg):
            model = load_model_nf4(
                cfg.name_or_path,
                dtype=dtype,
                double_quant=cfg.double_quant,
                device_map=cfg.device_map,
                trust_remote_code=cfg.trust_remote_code,
                attn_implementation=cfg.attn_implementation,
                revision=cfg.revision,
            )
    else:
        kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code)
        if cfg.revision:
            kwargs["revision"] = cfg.revision
        if cfg.device_map:
            kwargs["device_map"] = cfg.device_map
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if shard:
            from transformers.distributed.configuration_utils import DistributedConfig

            kwargs["distributed_config"] = DistributedConfig(fsdp_size=int(os.environ.get("WORLD_SIZE", "1")))
        with _weight_load_errors(cfg, RuntimeError):
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
        if family.model_type not in OUTSIDE_INTERFACE:
            from perft_cli.perft.frozen_experts import select_frozen_experts

            select_frozen_experts(model)  # the frozen base's experts: same numbers, input-gradient-only backward
    for p in model.parameters():
        p.requires_grad_(False)
    if not torch.cuda.is_available():
        # The model computes on the CPU: from here on freed blocks stay mapped for the next step. Not before: the
        # load's temporaries (whole bf16 weights on their way to NF4) are best handed back to the OS.
        from perft_cli.allocator import keep_freed_memory

        keep_freed_memory()
    return model, family


@contextmanager
def _weight_load_errors(cfg: ModelConfig, *more: type[Exception]) -> Iterator[None]:
    """A failed weight load as one ModelError line, pointing at the recipe keys that take part in it.

    OSError, ValueError, ImportError, safetensors' own SafetensorError (a truncated or foreign file) and ``more``.
    """
    try:
        yield
    except Exception as e:
        if not isinstance(e, (OSError, ValueError, ImportError, *more)) and type(e).__name__ != "SafetensorError":
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        keys = [k for k in ("attn_implementation", "device_map") if getattr(cfg, k)]
        hint = f" (check model.{' / model.'.join(keys)})" if keys else ""
        raise ModelError(
            f"cannot load the weights of {cfg.name_or_path!r}: {type(e).__name__}: {first}{hint}"
        ) from None


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer with a pad token (EOS when the model has none)."""
    _hub_unreachable(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(
            cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except (OSError, ValueError) as e:
        if hub.unreachable(cfg.name_or_path):
            raise _load_error("the tokenizer of ", cfg, e) from None
        raise ModelError(f"cannot load the tokenizer of {cfg.name_or_path!r}: {str(e).splitlines()[0]}") from None
    if not tok("The quick brown fox.", add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer from config.json alone when a folder has no tokenizer files
        raise ModelError(
            f"{cfg.name_or_path!r} has no usable tokenizer (it encodes text to nothing): copy the model's tokenizer "
            "files (tokenizer.json, tokenizer_config.json, ...) into it"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """The model built on the meta device from its config alone: shapes, names and dtypes, no memory, no weights."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_trained(
    ckpt: str | Path | None,
    *,
    base: bool = False,
    recipe: Recipe | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, Any, Recipe, Any, Any]:
    """Load the base model the checkpoint's recipe names, attach and load the trained adapters.

    Returns (model in eval mode, tokenizer, recipe, family, attached) where attached is None with ``base=True``
    (the frozen model, for the "before" column). ``recipe`` overrides the checkpoint's (e.g. another quantization);
    ``weights`` are the adapter weights if the caller has already read them with ``check_trained_weights``.
    """
    from perft_cli.adapters import attach_adapter, load_adapter_state
    from perft_cli.checkpoint import RECIPE_FILE, load_checkpoint_recipe, resolve_checkpoint

    path = resolve_checkpoint(ckpt) if ckpt is not None else None
    if recipe is None:
        if path is None:
            raise CheckpointError("no checkpoint given; pass --ckpt DIR (or a recipe with --base)")
        recipe = load_checkpoint_recipe(path)
    name = recipe.model.name_or_path
    if path is not None and name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise CheckpointError(
            f"the base model of {path} ({name}) does not exist any more; put it back there, or edit "
            f"model.name_or_path in {path / RECIPE_FILE} (perft eval also takes --set model.name_or_path=DIR)"
        )
    if base:
        weights = None
    else:
        if path is None:
            raise CheckpointError("evaluating adapters needs --ckpt DIR")
        if weights is None:
            weights = check_trained_weights(path, recipe)  # damaged or foreign weights: one line before the load
    model, family = load_model(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    attached = None
    if weights is not None:
        attached = attach_adapter(model, recipe.adapter, family)
        load_adapter_state(model, recipe.adapter.variant, weights)
    model.eval()
    return model, tokenizer, recipe, family, attached


def check_trained_weights(ckpt: Path, recipe: Recipe) -> dict[str, torch.Tensor]:
    """A checkpoint's adapter weights, checked against the model they are for before any weight is loaded.

    Reads adapter.safetensors (non-finite values are refused there) and compares every name and shape with the
    adapter attached to the model built on the meta device from its config alone (seconds, no memory), so a tensor
    of the wrong shape is one line before minutes of loading, not after them.
    """
    from perft_cli.adapters import attach_adapter
    from perft_cli.checkpoint import ADAPTER_FILE, load_adapter_weights
    from perft_cli.perft import is_adapter_param

    weights = load_adapter_weights(ckpt)
    config, family = load_config(recipe.model)
    meta = meta_model(config, DTYPES[recipe.model.dtype])
    attach_adapter(meta, recipe.adapter, family)
    expected = {n: tuple(p.shape) for n, p in meta.named_parameters() if is_adapter_param(n)}
    where = Path(ckpt) / ADAPTER_FILE
    for name, shape in expected.items():
        if name not in weights:
            raise CheckpointError(f"{where} has no {name}; was the checkpoint trained with another adapter or model?")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(
                f"{where}: adapter weight {name} has shape {tuple(weights[name].shape)}, expected {shape}; was the "
                "checkpoint trained with another adapter or model?"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{where} holds weights this model's adapter does not have ({unexpected[0]}, {len(unexpected)} in all); "
            "was the checkpoint trained with another adapter or model?"
        )
    return weights
