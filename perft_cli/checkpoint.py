"""Checkpoints: only what was trained (safetensors), the resolved recipe, and the state to resume exactly.

Layout of a run directory::

    RUN/
      recipe.yaml                    the resolved recipe
      metrics.jsonl                  one JSON object per logged step / eval
      best.json                      {"checkpoint": "checkpoints/step-00000080", "eval_loss": ...}
      checkpoints/step-00000080/     one complete checkpoint (written to a temporary dir, then renamed)
        adapter.safetensors          adapter weights by full parameter name
        recipe.yaml                  the resolved recipe (so a checkpoint stands alone)
        trainer_state.json           step, epoch, data position, losses, python/numpy RNG state
        optimizer.safetensors + optimizer.json, scheduler.json, rng.safetensors

A checkpoint directory is complete iff it holds ``adapter.safetensors`` and ``trainer_state.json`` and its name does
not start with ``.tmp``. Loading never unpickles: tensors come from safetensors, everything else from JSON/YAML.
"""

from __future__ import annotations

import json
import os
import shutil
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
        except (ValueError, KeyError):
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
        raw = yaml.safe_load((Path(ckpt) / RECIPE_FILE).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"cannot read {Path(ckpt) / RECIPE_FILE}: {e}") from None
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
