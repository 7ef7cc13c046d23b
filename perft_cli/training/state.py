"""Where training stands and how it is saved and restored: the data position, full-state checkpoints, resume.

A checkpoint holds the adapter, the optimizer, the scheduler, every process's RNG states and the data position
(epoch, batch within the epoch, data-order seed). The batch order is a pure function of (seed, epoch) (data.py), so
restoring all of it continues with exactly the batches, dropout masks and updates of the uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perft_cli import checkpoint as ck
from perft_cli import testing_hooks
from perft_cli.console import is_main_process, warn
from perft_cli.errors import CheckpointError
from perft_cli.training.resume import optimizer_files, read_training_state, rng_states, scheduler_json, set_rng_states
from perft_cli.training.setup import Run
from perft_cli.training.sharding import check_ranks_agree


@dataclass
class Position:
    """Where training stands: optimizer steps done and the next batch (epoch, index in epoch) of the data order."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    data_seed: int = 0
    tokens: int = 0
    best_eval: float | None = None
    best_step: int | None = None
    last_saved: int | None = None
    last_eval: int | None = None
    last_loss: float | None = None
    collapse: dict[str, Any] | None = None  # CollapseWatch.state() after the last step
    epoch_order: tuple[int, list[list[int]]] | None = field(default=None, repr=False)  # (epoch, its batches): a cache

    def progress(self, steps_per_epoch: int) -> float:
        return self.epoch + self.batch / steps_per_epoch

    def advance(self, steps_per_epoch: int) -> None:
        self.step += 1
        self.batch += 1
        if self.batch == steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0


def fresh_position(run: Run) -> Position:
    from accelerate.utils import set_seed

    set_seed(run.recipe.train.seed, device_specific=True)  # dropout differs between data-parallel processes
    return Position(data_seed=run.recipe.train.seed)


def restore(run: Run, ckpt: Path) -> Position:
    """Load adapter, optimizer, scheduler and this process's RNG states; return the saved data position."""
    from perft_cli.adapters import load_adapter_state

    saved = read_training_state(ckpt)
    load_adapter_state(run.unwrapped, run.attached.variant, ck.load_adapter_weights(ckpt))
    groups = saved["optimizer"]["param_groups"]
    if sum(len(g["params"]) for g in groups) != len(run.params):
        raise CheckpointError(f"cannot resume {ckpt}: its optimizer state is for another set of adapter parameters")
    # The optimizer's moments and the schedule's position come from the checkpoint; its hyperparameters come from
    # this recipe (load_state_dict would bring back the saved lr and weight decay, and a run resumed with a new
    # train.lr, weight_decay or max_steps would silently train with the old ones).
    fresh = [{k: g[k] for k in ("initial_lr", "weight_decay")} for g in run.optimizer.param_groups]
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    _apply_recipe_hyperparameters(run, fresh)
    st = saved["state"]
    world, rank = run.accelerator.num_processes, run.accelerator.process_index
    if st.get("world_size", 1) != world:
        warn(f"{ckpt} was saved by {st.get('world_size')} process(es), this run has {world}: not bitwise exact")
    _reconcile_best(run, st)
    d = st["data"]
    if d.get("fingerprint") != run.data_fingerprint or d.get("steps_per_epoch") != run.steps_per_epoch:
        warn(f"the training data or batch size differs from those of {ckpt}: the data position is approximate")
    epoch, batch = (d["epoch"], d["batch"]) if d["batch"] < run.steps_per_epoch else (d["epoch"] + 1, 0)
    r = rank % st.get("world_size", 1)
    set_rng_states({k.split(".", 1)[1]: v for k, v in saved["rng"].items() if k.startswith(f"rank{r}.")}, st["rng"][r])
    return Position(
        step=st["step"],
        epoch=epoch,
        batch=batch,
        data_seed=d["seed"],
        tokens=st.get("tokens", 0),
        best_eval=st.get("best_eval_loss"),
        best_step=st.get("best_step"),
        last_saved=st["step"],
        last_eval=st.get("last_eval_step"),
        last_loss=st.get("last_loss"),
        collapse=st.get("collapse_watch"),
    )


def _reconcile_best(run: Run, st: dict[str, Any]) -> None:
    """best.json names the best checkpoint of the trainer state being resumed (a crash between a best save and
    best.json, or a resume from an older step, can leave it on another one, which pruning would then keep instead)."""
    if not is_main_process() or st.get("best_step") is None:
        return
    best = ck.step_dir(run.run_dir, st["best_step"])
    if ck.is_checkpoint(best) and ck.best_checkpoint(run.run_dir) != best:
        ck.write_best(run.run_dir, best, st["best_eval_loss"], st["best_step"])


def _apply_recipe_hyperparameters(run: Run, fresh: list[dict[str, Any]]) -> None:
    """Put the recipe's base lr and weight decay back after loading, and the lr of the current step of the recipe's
    schedule (warmup and total steps as configured now). An unchanged recipe gives back the very same values."""
    sched = run.scheduler
    for group, hyper, fn in zip(run.optimizer.param_groups, fresh, sched.lr_lambdas, strict=True):
        group.update(hyper)
        group["lr"] = hyper["initial_lr"] * fn(sched.last_epoch)  # what LambdaLR.step() sets at this position
    sched.base_lrs = [h["initial_lr"] for h in fresh]
    sched._last_lr = [g["lr"] for g in run.optimizer.param_groups]


def save(run: Run, pos: Position, best: bool = False) -> Path:
    """Write the checkpoint of the current step (rank 0 writes; every process contributes its RNG states).

    ``best``: it is the new best by eval loss; best.json points at it before anything is pruned, so a crash at any
    moment leaves best.json on a checkpoint that exists (and resume reconciles it with the trainer state)."""
    from accelerate.utils import gather_object

    from perft_cli.adapters import adapter_state

    path = ck.step_dir(run.run_dir, pos.step)
    if pos.last_saved == pos.step and path.is_dir():
        if best and is_main_process():
            ck.write_best(run.run_dir, path, pos.best_eval, pos.step)
            ck.prune_checkpoints(run.run_dir)
        run.accelerator.wait_for_everyone()
        check_ranks_agree(trainable(run), run.accelerator.device, f"the save of step {pos.step}")
        return path
    rng = gather_object([rng_states()])  # [(tensors, json)] per process, in rank order
    if is_main_process():
        opt_tensors, opt_json = optimizer_files(run.optimizer.state_dict())
        rng_tensors = {f"rank{r}.{k}": v.contiguous() for r, (t, _) in enumerate(rng) for k, v in t.items()}
        write_or_explain(
            path,
            adapter=adapter_state(run.unwrapped, run.attached.variant),
            recipe=run.recipe,
            state=trainer_state(run, pos, [s for _, s in rng]),
            tensors={ck.OPTIMIZER_FILE: opt_tensors, ck.RNG_FILE: rng_tensors},
            jsons={ck.OPTIMIZER_JSON: opt_json, ck.SCHEDULER_FILE: scheduler_json(run.scheduler.state_dict())},
        )
        if best:
            ck.write_best(run.run_dir, path, pos.best_eval, pos.step)
        ck.prune_checkpoints(run.run_dir)
    run.accelerator.wait_for_everyone()
    # What rank 0 wrote is what every rank trains on: a cheap checksum all-reduce, a loud stop if they differ.
    check_ranks_agree(trainable(run), run.accelerator.device, f"the save of step {pos.step}")
    pos.last_saved = pos.step
    testing_hooks.kill_after_save(pos.step)
    return path


def trainable(run: Run) -> list[tuple[str, Any]]:
    """The adapter's parameters by name, in the model's order (the same on every rank)."""
    return [(n, p) for n, p in run.unwrapped.named_parameters() if p.requires_grad]


def write_or_explain(path: Path, **parts: Any) -> None:
    """``checkpoint.write_checkpoint``, with a failed write (a full disk, a folder gone) as one line that names the
    directory and the last complete checkpoint, which is kept: the run continues from it with --resume auto."""
    try:
        ck.write_checkpoint(path, **parts)
    except Exception as e:  # OSError, or safetensors' SafetensorError ("No space left on device")
        if not isinstance(e, OSError) and type(e).__name__ != "SafetensorError":
            raise
        why = getattr(e, "strerror", None) or " ".join(str(e).split()) or type(e).__name__
        last = ck.latest_checkpoint(path.parent.parent)
        kept = f"the last complete checkpoint, {last}, is kept" if last else "no earlier checkpoint exists"
        raise CheckpointError(
            f"cannot write the checkpoint {path}: {why}; {kept}. Free space (or fix {path.parent}) and continue "
            "with --resume auto"
        ) from None


def trainer_state(run: Run, pos: Position, rng_json: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "step": pos.step,
        "epoch": pos.progress(run.steps_per_epoch),
        "total_steps": run.total_steps,
        "data": {
            "epoch": pos.epoch,
            "batch": pos.batch,
            "seed": pos.data_seed,
            "steps_per_epoch": run.steps_per_epoch,
            "fingerprint": run.data_fingerprint,
        },
        "tokens": pos.tokens,
        "best_eval_loss": pos.best_eval,
        "best_step": pos.best_step,
        "last_eval_step": pos.last_eval,
        "collapse_watch": pos.collapse,
        "last_loss": pos.last_loss,
        "world_size": run.accelerator.num_processes,
        "rng": rng_json,
    }
