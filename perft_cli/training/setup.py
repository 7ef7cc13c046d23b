"""Setting up a training run: run directory checks, the Accelerator, coefficients, optimizer, schedule (``Run``)."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perft_cli import checkpoint as ck
from perft_cli.config import Recipe
from perft_cli.console import info, is_main_process, warn
from perft_cli.data import Examples, fingerprint
from perft_cli.errors import CheckpointError, DataError, RecipeError
from perft_cli.outputs import write_text_atomic
from perft_cli.training.resume import check_resumable, check_resume_compatible, find_resume, saved_state


@dataclass
class Run:
    """What the loop works with: a plain holder (no Trainer class, no callbacks)."""

    recipe: Recipe
    run_dir: Path
    accelerator: Any
    model: Any  # as prepared (DDP-wrapped in data parallel runs, sharded in place with train.sharding: fsdp)
    unwrapped: Any
    attached: Any
    optimizer: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    pad_id: int
    device: torch.device
    base_coef: float | None  # None: the family returns no aux loss
    base_coef_source: str
    perft_coef: float | None  # None: no PERFT router
    train_set: Examples
    val_set: Examples
    steps_per_epoch: int
    total_steps: int
    accounting: dict[str, Any]
    data_fingerprint: str  # of the tokenised training set, saved with checkpoints to notice changed data
    sharded: bool = False  # train.sharding: fsdp (training/sharding.py)


def check_trackers(report_to: list[str]) -> None:
    """train.report_to names a tracker whose package is missing: a one-line error before anything loads."""
    import importlib.util

    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
    for tracker in report_to:
        if not any(importlib.util.find_spec(p) for p in packages[tracker]):
            raise RecipeError(
                f"train.report_to includes {tracker!r} but the {packages[tracker][0]} package is not installed; "
                f"pip install {packages[tracker][0]}, or remove it from train.report_to"
            )


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: str | None) -> Path | None:
    """Check the run directory before the model loads; returns the checkpoint to resume from (or None).

    Writable or a one-line error; a fresh run refuses a directory that already has checkpoints unless --resume;
    the checkpoint to resume must match the recipe's model and adapter shape.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".perft-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RecipeError(
            f"cannot write to the output directory {str(run_dir)!r}: {e.strerror or e}; choose another with "
            "--output-dir or output_dir"
        ) from None
    if is_main_process():
        lock_run_dir(run_dir)  # before anything in it is cleaned or read: another run may be writing it
        stale = ck.clean_stale(run_dir)  # left by a save that was killed (a complete one is put back in place)
        if stale:
            info(f"removed {len(stale)} incomplete checkpoint(s) left by an interrupted save: {', '.join(stale)}")
    existing = ck.latest_checkpoint(run_dir)
    if resume is None and existing is not None:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints (latest {existing.name}); continue it with --resume auto, or "
            "choose another --output-dir"
        )
    ckpt = find_resume(run_dir, resume)
    if resume == "auto" and ckpt is None:
        info(f"--resume auto: no checkpoint in {run_dir / ck.CKPT_DIR}, starting a fresh run")
    if ckpt is not None:
        differ = check_resume_compatible(ck.load_checkpoint_recipe(ckpt), recipe, ckpt)
        check_resumable(ckpt)
        saved_state(ckpt)  # a truncated trainer_state.json: one line now, not after the model has loaded
        from perft_cli.modeling import check_trained_weights

        check_trained_weights(ckpt, recipe)  # a damaged or foreign adapter file, likewise (meta device, seconds)
        if differ:
            warn(f"resuming {ckpt} with different settings ({', '.join(differ)}): the run will not be exact")
    return ckpt


LOCK_FILE = ".perft-train.lock"
_locks: dict[Path, int] = {}  # run directory -> the open, flock'ed lock file of this process


def lock_run_dir(run_dir: Path) -> None:
    """Hold ``RUN/.perft-train.lock`` (an exclusive flock) while this process trains into ``run_dir``.

    A second ``perft train`` on the same directory is refused at once (both would write checkpoints and
    metrics.jsonl). The kernel drops the lock when a process ends, so a crashed or killed run never leaves it stuck.
    """
    import fcntl

    key = Path(run_dir).resolve()
    if key in _locks:
        return
    path = key / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CheckpointError(
            f"{run_dir} is being trained by another perft train (pid {holder}); wait for it to end, or choose "
            "another --output-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _locks[key] = fd


def unlock_run_dir(run_dir: Path) -> None:
    """Release ``lock_run_dir``'s lock (and remove its file) if this process holds it."""
    key = Path(run_dir).resolve()
    fd = _locks.pop(key, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        (key / LOCK_FILE).unlink()
    os.close(fd)  # closing the file releases the flock


def commit_run_dir(run_dir: Path, recipe: Recipe, ckpt: Path | None) -> None:
    """Once data, tokenizer and model have loaded: record the recipe in the run directory and, resuming from an
    older step, set the later checkpoints aside. Nothing in the run directory changes before this, so a run that
    fails its checks leaves an existing run as it was."""
    if not is_main_process():
        return
    if ckpt is not None:
        step = saved_state(ckpt)["step"]
        moved = ck.set_aside_newer(run_dir, step)
        if moved is not None:
            warn(
                f"resuming from step {step}: this run's later checkpoints belong to the abandoned continuation "
                f"and were moved to {moved}"
            )
    write_text_atomic(run_dir / ck.RECIPE_FILE, recipe.to_yaml())


def make_accelerator(recipe: Recipe, run_dir: Path):
    """Accelerator with bf16 autocast on CUDA (fp32 on CPU) and accumulation = batch / (micro * processes)."""
    from accelerate import Accelerator

    from perft_cli.training.sharding import check_sharding

    t = recipe.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_sharding(recipe)
    if t.batch_size % (t.micro_batch_size * world):
        raise RecipeError(
            f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size={t.micro_batch_size} "
            f"x {world} process(es)"
        )
    if recipe.model.device_map and world > 1:
        raise RecipeError(
            f"model.device_map={recipe.model.device_map!r} spreads one model over all GPUs (model parallel); it "
            "cannot be combined with data parallel launches: start a single process"
        )
    cuda = torch.cuda.is_available()
    # A float32 base keeps float32 compute; a bf16/fp16 base gets autocast so the fp32 adapters run in it too.
    mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(recipe.model.dtype, "no") if cuda else "no"
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=mixed,
        gradient_accumulation_steps=t.batch_size // (t.micro_batch_size * world),
        log_with=list(t.report_to) or None,
        project_dir=str(run_dir),
    )
    if t.report_to:
        accelerator.init_trackers("perft", config=flat_config(recipe))
    return accelerator


def flat_config(recipe: Recipe) -> dict[str, Any]:
    """Dotted scalar keys for trackers' hyperparameter tables."""
    flat = {}
    for section, values in recipe.model_dump(mode="json").items():
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            name = f"{section}.{key}" if key else section
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def schedule_length(recipe: Recipe, n_train: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps): train.max_steps, else ceil(train.epochs * steps per epoch)."""
    steps_per_epoch = n_train // recipe.train.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"only {n_train} training examples, fewer than train.batch_size={recipe.train.batch_size}; lower "
            "train.batch_size or data.val_size"
        )
    return steps_per_epoch, recipe.train.max_steps or math.ceil(recipe.train.epochs * steps_per_epoch)


def check_quantized(model, recipe: Recipe) -> None:
    """With nf4, refuse to train unless every routed expert really is 4-bit (quant.check_audit)."""
    if recipe.model.quantization == "none":
        return
    from perft_cli.quant import audit, check_audit

    check_audit(audit(model, quantization=recipe.model.quantization), recipe.model.quantization)


def base_aux_coef(model, recipe: Recipe, family) -> tuple[float | None, str]:
    """The base router's aux-loss coefficient in use and where it came from (None: the family returns none)."""
    if not family.returns_aux_loss:
        return None, "none"
    coef, source = recipe.adapter.base_aux_loss_coef, "adapter.base_aux_loss_coef"
    if coef is None:
        coef, source = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0), "the model's config"
    # Keep the model consistent with what we add, for anyone calling it with labels later.
    model.config.router_aux_loss_coef = coef
    if hasattr(model, "router_aux_loss_coef"):
        model.router_aux_loss_coef = coef
    return coef, source


def enable_checkpointing(model) -> None:
    """Activation checkpointing, non-reentrant (works with frozen inputs and keeps PERFT-R's recorder simple)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 (gradient_checkpointing_* deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def setup_training(recipe, run_dir, accelerator, model, attached, tokenizer, train_set, val_set, schedule) -> Run:
    """Aux-loss coefficients, activation checkpointing, AdamW over the adapter only, the LR schedule, prepare.

    ``schedule`` is ``schedule_length(recipe, len(train_set))``, computed once before the model loads.
    """
    from transformers import get_linear_schedule_with_warmup

    from perft_cli.adapters import accounting, trainable_parameters

    base_coef, base_source = base_aux_coef(model, recipe, attached.family)
    perft_coef = recipe.adapter.router_aux_loss_coef if attached.variant == "perft-r" else None
    model.config.use_cache = False  # no KV cache while training
    if recipe.train.gradient_checkpointing:
        enable_checkpointing(model)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    counts = accounting(model, attached)  # before sharding: it counts whole tensors
    sharded = recipe.train.sharding == "fsdp"
    if sharded:  # FSDP2 in place, adapters replicated (training/sharding.py); no DDP wrapper
        from perft_cli.training.sharding import shard_model

        prepared, device = shard_model(model, accelerator.device), accelerator.device
    elif recipe.model.device_map:  # model parallel: the model stays where from_pretrained put its layers
        prepared, device = model, model.get_input_embeddings().weight.device
    else:
        prepared, device = accelerator.prepare_model(model), accelerator.device
    optimizer = accelerator.prepare_optimizer(optimizer)
    steps_per_epoch, total_steps = schedule
    # Linear warmup, then linear decay to 0. Not passed through accelerator.prepare: its wrapper would step the
    # schedule once per process per optimizer step.
    scheduler = get_linear_schedule_with_warmup(optimizer.optimizer, recipe.train.warmup_steps, total_steps)
    model.train()
    return Run(
        recipe=recipe,
        run_dir=run_dir,
        accelerator=accelerator,
        model=prepared,
        unwrapped=model,
        attached=attached,
        optimizer=optimizer,
        scheduler=scheduler,
        params=params,
        pad_id=tokenizer.pad_token_id,
        device=device,
        base_coef=base_coef,
        base_coef_source=base_source,
        perft_coef=perft_coef,
        train_set=train_set,
        val_set=val_set,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        accounting=counts,
        data_fingerprint=fingerprint(train_set),
        sharded=sharded,
    )


def start_info(run: Run, family, source: str, resume_from: Path | None, start_step: int) -> dict[str, Any]:
    r = run.recipe
    return {
        "base_aux_coef": run.base_coef,
        "base_aux_source": run.base_coef_source,
        "perft_aux_coef": run.perft_coef,
        "model": r.model.name_or_path,
        "family": family.display,
        "dtype": r.model.dtype,
        "quantization": r.model.quantization,
        "variant": r.adapter.variant,
        "trainable_params": run.accounting["trainable_params"],
        "activated_params": run.accounting["activated_params"],
        "train_examples": len(run.train_set),
        "val_examples": len(run.val_set),
        "source": source,
        "steps_per_epoch": run.steps_per_epoch,
        "total_steps": run.total_steps,
        "batch_size": r.train.batch_size,
        "micro_batch_size": r.train.micro_batch_size,
        "accumulation": run.accelerator.gradient_accumulation_steps,
        "processes": run.accelerator.num_processes,
        "sharding": r.train.sharding,
        "resumed_from": str(resume_from) if resume_from else None,
        "start_step": start_step,
    }


def teardown(accelerator, clean: bool) -> None:
    """End trackers and the process group; without this a torchrun rank aborts at exit (platform.md)."""
    if clean:
        accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
