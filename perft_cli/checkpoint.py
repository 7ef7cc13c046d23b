"""A checkpoint's files, the run directory's layout, and what ``--ckpt`` may name (resolution and checks).

A checkpoint holds only what was trained (safetensors), the resolved recipe, and the state to resume exactly (the
optimizer / scheduler / RNG files are read and written by ``training/resume.py``).

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
import shlex
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from perft_cli.config import Recipe, recipe_from_dict
from perft_cli.errors import CheckpointError
from perft_cli.outputs import write_text_atomic

if TYPE_CHECKING:  # torch is imported by the functions that write or read tensors: a recipe error needs none of it
    import torch

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "trainer_state.json"
RECIPE_FILE = "recipe.yaml"
BEST_FILE = "best.json"
CKPT_DIR = "checkpoints"
MERGE_FILE = "perft-merge.json"  # written by perft merge into its output
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "rng.safetensors"
RESUME_FILES = (STATE_FILE, OPTIMIZER_FILE, OPTIMIZER_JSON, SCHEDULER_FILE, RNG_FILE)


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


def run_dir_of(ckpt: Path) -> Path | None:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/step-N``), None for a checkpoint on its own."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else None


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
    try:
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
    except BaseException:  # a full disk, a kill signal turned exception: no partial .tmp directory left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
        weights = load_file(str(Path(ckpt) / ADAPTER_FILE))
    except Exception as e:  # safetensors raises its own error types for truncated / foreign files
        raise CheckpointError(f"cannot read {Path(ckpt) / ADAPTER_FILE}: {e}") from None
    bad = [name for name, t in weights.items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:  # NaN / inf weights would only show up later as "verification failed: nan" or NaN accuracies
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{Path(ckpt) / ADAPTER_FILE} holds non-finite values in {bad[0]}{more}: these adapter weights diverged; "
            "use an earlier checkpoint of the run"
        )
    return weights


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:08d}"


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
    """Point best.json at ``ckpt`` (written whole: outputs.write_text_atomic)."""
    rel = Path(ckpt).resolve().relative_to(Path(run_dir).resolve())
    data = {"checkpoint": rel.as_posix(), "eval_loss": eval_loss, "step": step}
    write_text_atomic(Path(run_dir) / BEST_FILE, json.dumps(data, indent=2))


def prune_checkpoints(run_dir: Path) -> list[Path]:
    """Delete every complete checkpoint but the latest and the best; returns the deleted ones."""
    keep = {latest_checkpoint(run_dir), best_checkpoint(run_dir)}
    gone = [p for p in list_checkpoints(run_dir) if p not in keep]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


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
    elif command == "generate":
        fix = (
            f"it generates as it is (AutoModelForCausalLM.from_pretrained), or pass the run it came from{merged_from}"
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
