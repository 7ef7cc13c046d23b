"""Training state <-> files: the optimizer, the scheduler and the RNG states as safetensors + JSON (never pickle),
and the checks that a checkpoint can resume this recipe's run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from perft_cli import checkpoint as ck
from perft_cli.config import Recipe
from perft_cli.errors import CheckpointError

# Adapter settings that change the shapes or meaning of the saved weights: resuming across them is an error.
SHAPE_KEYS = ("variant", "expert", "num_experts", "top_k", "rank")
# Keys that change what the saved weights compute (the LoRA scale, how PERFT-R weighs its experts): a resume with
# other values would continue a different function, so it is refused like a shape change.
MEANING_KEYS = ("alpha", "renormalize", "scale_by_base_router")
# Left out of the "not exact" warning: checked above (the model by its folder name), or no effect once weights exist.
NOT_COMPARED = (*SHAPE_KEYS, *MEANING_KEYS, "name_or_path", "init")


def optimizer_files(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<index>.<key>``) and JSON (scalars, param groups)."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``optimizer_files``."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def scheduler_json(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of a scheduler's state_dict (LambdaLR keeps its lambdas as None; they are code)."""
    return {k: v for k, v in state_dict.items() if isinstance(v, int | float | str | bool | list | type(None))}


def rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: torch generators as uint8 tensors, python ``random`` and numpy as JSON."""
    import random

    import numpy as np

    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, states


def set_rng_states(tensors: dict[str, torch.Tensor], states: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned (CUDA states only for the devices present)."""
    import random

    import numpy as np

    torch.set_rng_state(tensors["cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in tensors:
                torch.cuda.set_rng_state(tensors[f"cuda{i}"], i)
    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def saved_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json (step, data position, ...), or a one-line CheckpointError naming it."""
    path = Path(ckpt) / ck.STATE_FILE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} cannot be resumed: {ck.STATE_FILE} is missing") from None
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{ckpt} cannot be resumed: {ck.STATE_FILE}: {type(e).__name__}: {first} (a damaged checkpoint: resume "
            "from another with --resume CKPT_DIR)"
        ) from None
    return state


def read_training_state(ckpt: Path) -> dict[str, Any]:
    """Everything ``--resume`` needs from a checkpoint: trainer state, optimizer, scheduler and RNG states."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    loaded: dict[str, Any] = {ck.STATE_FILE: saved_state(ckpt)}
    reading = ""  # the file being read, for the error message
    try:
        for reading in (ck.OPTIMIZER_JSON, ck.SCHEDULER_FILE):
            loaded[reading] = json.loads((ckpt / reading).read_text())
        for reading in (ck.OPTIMIZER_FILE, ck.RNG_FILE):
            loaded[reading] = load_file(str(ckpt / reading))
        reading = ck.OPTIMIZER_JSON  # its param groups and scalars are matched to the tensors here
        optimizer = optimizer_state_dict(loaded[ck.OPTIMIZER_FILE], loaded[ck.OPTIMIZER_JSON])
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{ckpt} cannot be resumed: {Path(e.filename).name} is missing (only checkpoints written by "
            "'perft train' hold the optimizer and RNG state)"
        ) from None
    except Exception as e:  # OSError, ValueError, KeyError, safetensors' SafetensorError for a truncated file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{ckpt} cannot be resumed: {reading}: {type(e).__name__}: {first} (a damaged checkpoint: resume from "
            "another with --resume CKPT_DIR)"
        ) from None
    return {
        "state": loaded[ck.STATE_FILE],
        "optimizer": optimizer,
        "scheduler": loaded[ck.SCHEDULER_FILE],
        "rng": loaded[ck.RNG_FILE],
    }


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` = newest complete one in the run dir (None if there is none)."""
    if resume is None:
        return None
    if resume == "auto":
        return ck.latest_checkpoint(run_dir)
    if not Path(resume).exists():
        raise CheckpointError(f"--resume {resume!r} does not exist; pass 'auto' or a checkpoint directory")
    return ck.resolve_checkpoint(resume, prefer="latest")


def check_resumable(ckpt: Path) -> None:
    """A checkpoint without the full training state cannot resume: say so before the model loads."""
    missing = [f for f in ck.RESUME_FILES if not (Path(ckpt) / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{ckpt} cannot be resumed: it has no {', '.join(missing)} (only checkpoints written by 'perft train' "
            "hold the optimizer and RNG state)"
        )


def check_resume_compatible(saved: Recipe, recipe: Recipe, ckpt: Path) -> list[str]:
    """Raise CheckpointError when the checkpoint was trained for another model or adapter shape.

    Returns the data/train keys that differ (resuming then continues, but not exactly as the first run would).
    """
    if Path(saved.model.name_or_path).name != Path(recipe.model.name_or_path).name:
        raise CheckpointError(
            f"cannot resume {ckpt}: it was trained on model {saved.model.name_or_path!r}, this recipe uses "
            f"{recipe.model.name_or_path!r}"
        )
    for key in (*SHAPE_KEYS, *MEANING_KEYS):
        a, b = _adapter_value(saved, key), _adapter_value(recipe, key)
        if a != b:
            raise CheckpointError(
                f"cannot resume {ckpt}: it was trained with adapter.{key}={a!r}, this recipe has adapter.{key}={b!r}"
            )
    differ = []
    for section in ("model", "adapter", "data", "train"):
        old, new = getattr(saved, section).model_dump(), getattr(recipe, section).model_dump()
        differ += [f"{section}.{k}" for k in new if old.get(k) != new[k] and k not in NOT_COMPARED]
    return differ


def _adapter_value(recipe: Recipe, key: str) -> Any:
    a = recipe.adapter
    if key == "alpha":  # None means 2 * rank (reference scripts): the same scale as writing it out
        return a.lora_alpha
    return getattr(a, key)
