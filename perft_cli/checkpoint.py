"""Checkpoints: only what was trained (safetensors), the resolved recipe, and the state to resume exactly.

Layout of a run directory::

    RUN/
      recipe.yaml                    the resolved recipe
      metrics.jsonl                  one JSON object per logged step / eval
      best.json                      {"checkpoint": "checkpoints/step-00000080", "eval_loss": ...}
      summary.json                   the end-of-run summary (time, tokens/s, peak memory, best eval loss)
      checkpoints/step-00000080/     one complete checkpoint (written to a temporary dir, then renamed)
        adapter.safetensors          adapter weights by full parameter name
        recipe.yaml                  the resolved recipe (so a checkpoint stands alone)
        trainer_state.json           step, epoch, data position, losses, python/numpy RNG state (per process)
        optimizer.safetensors        AdamW tensors as ``state.<param index>.<key>``; optimizer.json the rest
        scheduler.json               the LR scheduler's state_dict
        rng.safetensors              torch CPU / CUDA generator states as uint8 tensors, ``rank<r>.cpu`` etc.

A checkpoint directory is complete iff it holds ``adapter.safetensors`` and ``trainer_state.json`` and its name does
not start with ``.tmp``. Loading never unpickles: tensors come from safetensors, everything else from JSON/YAML.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from perft_cli.config import Recipe, recipe_from_dict
from perft_cli.errors import CheckpointError

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
BEST_FILE = "best.json"
CKPT_DIR = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng.safetensors"
RESUME_FILES = (STATE_FILE, OPTIMIZER_FILE, OPTIMIZER_JSON, SCHEDULER_FILE, RNG_FILE)
# Adapter settings that change the shapes or meaning of the saved weights: resuming across them is an error.
SHAPE_KEYS = ("variant", "expert", "num_experts", "top_k", "rank")
# Keys that change what the saved weights compute (the LoRA scale, how PERFT-R weighs its experts): a resume with
# other values would continue a different function, so it is refused like a shape change.
MEANING_KEYS = ("alpha", "renormalize", "scale_by_base_router")
# Left out of the "not exact" warning: checked above (the model by its folder name), or no effect once weights exist.
NOT_COMPARED = (*SHAPE_KEYS, *MEANING_KEYS, "name_or_path", "init")


def is_checkpoint(path: Path) -> bool:
    return (path / ADAPTER_FILE).is_file() and (path / RECIPE_FILE).is_file() and not path.name.startswith(".tmp")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (by step number in the name)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_checkpoint(p) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def best_checkpoint(run_dir: Path) -> Path | None:
    best = Path(run_dir) / BEST_FILE
    if best.is_file():
        try:
            path = Path(run_dir) / json.loads(best.read_text())["checkpoint"]
        except (OSError, ValueError, KeyError, TypeError):  # unreadable, not JSON, not {"checkpoint": "..."}
            return None
        if is_checkpoint(path):
            return path
    return None


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint directory from ``--ckpt``: the directory itself, or a run's best (else latest) checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass a run directory or a checkpoint")
    if is_checkpoint(path):
        return path
    found = (best_checkpoint(path) if prefer == "best" else None) or latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{str(path)!r} holds no complete checkpoint ({ADAPTER_FILE} + {RECIPE_FILE}); has the run saved yet?"
        )
    return found


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    target: Path,
    *,
    adapter: dict[str, torch.Tensor],
    recipe: Recipe,
    state: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    jsons: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint atomically: into ``.tmp-<name>`` beside it, fsync, then rename into place.

    A crash or SIGKILL at any moment leaves either the previous state or the complete new checkpoint, never a
    partial one (a stale ``.tmp-*`` directory is ignored by readers and removed by the next save).
    ``tensors`` maps extra file names to tensor dicts (saved as safetensors); ``jsons`` maps file names to JSON data.
    """
    from safetensors.torch import save_file

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(adapter, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "producer": "perft"})
    for name, data in (tensors or {}).items():
        save_file(data, str(tmp / name), metadata={"format": "pt"})
    for name, data in (jsons or {}).items():
        (tmp / name).write_text(json.dumps(data, indent=2))
    (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # written last: marks the checkpoint complete
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    if target.exists():  # re-saving a step (after a resume): move the old one out of the way first
        old = target.parent / f".tmp-old-{target.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    _fsync_dir(target.parent)
    return target


def load_checkpoint_recipe(ckpt: Path) -> Recipe:
    """The recipe saved with a checkpoint; relative paths in it are relative to the checkpoint directory."""
    try:
        raw = yaml.safe_load((Path(ckpt) / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
            what = f"{e.problem or e.context} (line {e.problem_mark.line + 1})"
        raise CheckpointError(
            f"cannot read {Path(ckpt) / RECIPE_FILE}: {what}; the checkpoint is damaged (or not written by perft)"
        ) from None
    return recipe_from_dict(raw, f"checkpoint recipe {Path(ckpt) / RECIPE_FILE}", base=Path(ckpt).resolve())


def load_adapter_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(Path(ckpt) / ADAPTER_FILE))
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise CheckpointError(f"cannot read {Path(ckpt) / ADAPTER_FILE}: {e}") from None


def load_trained(
    ckpt: str | Path | None,
    *,
    base: bool = False,
    recipe: Recipe | None = None,
) -> tuple[Any, Any, Recipe, Any, Any]:
    """Load the base model the checkpoint's recipe names, attach and load the trained adapters.

    Returns (model in eval mode, tokenizer, recipe, family, attached) where attached is None with ``base=True``
    (the frozen model, for the "before" column). ``recipe`` overrides the checkpoint's (e.g. another quantization).
    """
    from perft_cli.adapters import attach_adapter, load_adapter_state
    from perft_cli.modeling import load_model, load_tokenizer

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
    model, family = load_model(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    attached = None
    if not base:
        if path is None:
            raise CheckpointError("evaluating adapters needs --ckpt DIR")
        attached = attach_adapter(model, recipe.adapter, family)
        load_adapter_state(model, recipe.adapter.variant, load_adapter_weights(path))
    model.eval()
    return model, tokenizer, recipe, family, attached


# ---------------------------------------------------------------------------------------------------------------
# Training state: optimizer, scheduler and RNG as safetensors + JSON (never pickle), resume, retention


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:08d}"


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


def read_training_state(ckpt: Path) -> dict[str, Any]:
    """Everything ``--resume`` needs from a checkpoint: trainer state, optimizer, scheduler and RNG states."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    loaded: dict[str, Any] = {}
    reading = ""  # the file being read, for the error message
    try:
        for reading in (STATE_FILE, OPTIMIZER_JSON, SCHEDULER_FILE):
            loaded[reading] = json.loads((ckpt / reading).read_text())
        for reading in (OPTIMIZER_FILE, RNG_FILE):
            loaded[reading] = load_file(str(ckpt / reading))
        reading = OPTIMIZER_JSON  # its param groups and scalars are matched to the tensors here
        optimizer = optimizer_state_dict(loaded[OPTIMIZER_FILE], loaded[OPTIMIZER_JSON])
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
        "state": loaded[STATE_FILE],
        "optimizer": optimizer,
        "scheduler": loaded[SCHEDULER_FILE],
        "rng": loaded[RNG_FILE],
    }


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` names: ``auto`` = newest complete one in the run dir (None if there is none)."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if not Path(resume).exists():
        raise CheckpointError(f"--resume {resume!r} does not exist; pass 'auto' or a checkpoint directory")
    return resolve_checkpoint(resume, prefer="latest")


def check_resumable(ckpt: Path) -> None:
    """A checkpoint without the full training state cannot resume: say so before the model loads."""
    missing = [f for f in RESUME_FILES if not (Path(ckpt) / f).is_file()]
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
        return a.alpha if a.alpha is not None else 2.0 * a.rank
    return getattr(a, key)


def clean_stale(run_dir: Path) -> list[str]:
    """Remove ``.tmp-*`` directories a killed save left behind; returns their names.

    A save killed between the two renames of a re-saved step leaves ``.tmp-old-NAME`` (the previous copy) and
    ``.tmp-NAME`` (the new one), both complete, and no ``NAME``: the new copy is put in place if it is complete
    (its trainer state is written last), else the old one, so the step is never lost.
    """
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    for old in sorted(root.glob(".tmp-old-*")):
        name = old.name.removeprefix(".tmp-old-")
        new = root / f".tmp-{name}"
        keep = new if _complete(new) else old if _complete(old) else None
        if keep is not None and not (root / name).exists():
            os.replace(keep, root / name)
    stale = sorted(p for p in root.glob(".tmp-*") if p.is_dir())
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in stale]


def _complete(path: Path) -> bool:
    """A checkpoint directory (whatever its name) with every file a resume needs."""
    return path.is_dir() and all((path / f).is_file() for f in (ADAPTER_FILE, RECIPE_FILE, *RESUME_FILES))


def set_aside_newer(run_dir: Path, step: int) -> Path | None:
    """Move this run's checkpoints after ``step`` to ``abandoned/after-step-<step>-<time>/`` (returned; None if
    there are none): resuming from an older checkpoint starts a new continuation, and the old one's later steps
    would otherwise count as the newest (``--resume auto``, pruning) and delete every checkpoint the new one writes.
    """
    newer = [p for p in list_checkpoints(run_dir) if int(p.name.removeprefix("step-")) > step]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = Path(run_dir) / "abandoned" / f"after-step-{step:08d}-{stamp}"
    dest.mkdir(parents=True, exist_ok=True)
    for p in newer:
        os.replace(p, dest / p.name)
    _fsync_dir(Path(run_dir) / CKPT_DIR)
    return dest


def write_best(run_dir: Path, ckpt: Path, eval_loss: float, step: int) -> None:
    """Point best.json at ``ckpt`` (written to a temporary file and renamed, like checkpoints)."""
    tmp = Path(run_dir) / f".tmp-{BEST_FILE}"
    rel = Path(ckpt).resolve().relative_to(Path(run_dir).resolve())
    tmp.write_text(json.dumps({"checkpoint": rel.as_posix(), "eval_loss": eval_loss, "step": step}, indent=2))
    os.replace(tmp, Path(run_dir) / BEST_FILE)


def prune_checkpoints(run_dir: Path) -> list[Path]:
    """Delete every complete checkpoint but the latest and the best; returns the deleted ones."""
    keep = {latest_checkpoint(run_dir), best_checkpoint(run_dir)}
    gone = [p for p in list_checkpoints(run_dir) if p not in keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
