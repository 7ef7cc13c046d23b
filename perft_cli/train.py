"""``perft train``: ``run_train`` reads top to bottom (setup, one loop, cleanup); the loop body is a few named calls.

Accelerate drives devices, data parallelism (``torchrun`` / ``accelerate launch``), mixed precision and gradient
accumulation (training/setup.py). One optimizer step is training/step.py; the data position, checkpoints and exact
resume are training/state.py; what is shown and logged is progress.py. On CPU a run resumed from a checkpoint is
bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from perft_cli import checkpoint as ck
from perft_cli import testing_hooks
from perft_cli.config import Recipe
from perft_cli.console import human_bytes, info, is_main_process, out, print_json, warn
from perft_cli.training.collapse import CollapseWatch
from perft_cli.training.loss_plot import LOSS_FILE, LossPlot
from perft_cli.training.progress import (
    MetricsLog,
    Timer,
    TrainProgress,
    peak_memory,
    print_start,
    warn_collapse,
    write_summary,
)
from perft_cli.training.setup import (
    Run,
    check_quantized,
    check_trackers,
    commit_run_dir,
    make_accelerator,
    prepare_run_dir,
    schedule_length,
    setup_training,
    start_info,
    teardown,
    unlock_run_dir,
)
from perft_cli.training.state import Position, fresh_position, restore, save
from perft_cli.training.step import (
    apply_update,
    check_finite,
    check_update,
    clip_gradients,
    evaluate,
    next_micro_batches,
    train_step,
)


def run_train(recipe: Recipe, *, resume: str | None = None, dry_run: bool = False, as_json: bool = False) -> dict:
    """Train the recipe's adapter; returns the summary (``status`` is "done" or "interrupted")."""
    if dry_run:
        return run_dry_run(recipe, as_json=as_json)
    from accelerate.utils import set_seed

    from perft_cli.adapters import attach_adapter
    from perft_cli.data import load_examples
    from perft_cli.modeling import load_model, load_tokenizer

    run_dir = Path(recipe.output_dir)
    check_trackers(recipe.train.report_to)
    new_dir = not run_dir.exists()
    try:  # every check before the run directory is touched; a run that fails them leaves no directory behind
        resume_from = prepare_run_dir(run_dir, recipe, resume)
        accelerator = make_accelerator(recipe, run_dir)
        set_seed(recipe.train.seed)  # the same adapter initialisation on every process

        tokenizer = load_tokenizer(recipe.model)
        train_set, val_set, source = load_examples(recipe.data, tokenizer)
        schedule = schedule_length(recipe, len(train_set))  # too few examples for a batch: said before the model loads
        model, family = load_model(recipe.model, shard=recipe.train.sharding == "fsdp")
        attached = attach_adapter(model, recipe.adapter, family)
        check_quantized(model, recipe)
        run = setup_training(recipe, run_dir, accelerator, model, attached, tokenizer, train_set, val_set, schedule)
        commit_run_dir(run_dir, recipe, resume_from)
        check_eval_tasks(recipe)
    except BaseException:
        unlock_run_dir(run_dir)
        if new_dir and is_main_process():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    pos = restore(run, resume_from) if resume_from else fresh_position(run)
    print_start(start_info(run, family, source, resume_from, pos.step))

    metrics = MetricsLog(run_dir, accelerator, keep_until=pos.step if resume_from else None)
    plot = LossPlot(run_dir, enabled=is_main_process())
    if is_main_process() and not plot.enabled:
        info(f"matplotlib is not installed: no {LOSS_FILE} (pip install 'perft-cli[plot]')")
    progress = TrainProgress(run.total_steps, pos.step)
    watch = CollapseWatch(attached.num_experts, attached.top_k, recipe.train.collapse_share)
    watch.load(pos.collapse)  # a resumed run keeps counting its streaks (and does not warn twice)
    timer, session_tokens, train_seconds, status = Timer(), 0, 0.0, "done"
    try:
        with interrupt_flag() as stop:
            if resume_from is None and len(val_set):
                log_eval(run, pos, metrics, progress)  # the "before" eval loss
            while pos.step < run.total_steps:
                timer.lap()  # time the step alone: eval and save time is not training throughput
                stats = train_step(run, next_micro_batches(run, pos), watch, stop)
                stats["grad_norm"] = clip_gradients(run)
                check_finite(run, pos, stats)
                stats["lr"] = apply_update(run)
                pos.advance(run.steps_per_epoch)
                check_update(run, pos)  # no checkpoint of diverged weights
                session_tokens += stats["tokens"]
                seconds = timer.lap()
                train_seconds += seconds
                log_step(run, pos, stats, seconds, metrics, progress, watch)
                plot.update()
                if pos.step % recipe.train.eval_every == 0 or pos.step == run.total_steps:
                    log_eval(run, pos, metrics, progress)
                if pos.step % recipe.train.save_every == 0 or pos.step == run.total_steps or stats["stop"]:
                    save(run, pos)
                if stats["stop"]:
                    status = "interrupted"
                    break
    except BaseException:
        progress.close()
        teardown(accelerator, clean=False)
        unlock_run_dir(run_dir)
        raise
    progress.close()
    try:
        testing_hooks.sigint_at("summary")
        plot.update(force=True)
        summary = finish(run, pos, status, timer.total(), train_seconds, session_tokens)
        teardown(accelerator, clean=True)
    except KeyboardInterrupt:  # a Ctrl-C after the last step: every step is saved, only the summary is lost
        say_interrupted_after_end(run, pos)
        raise
    finally:
        unlock_run_dir(run_dir)
    if stop["stop"] and status == "done":  # a Ctrl-C during the final eval: the run finished anyway
        summary["interrupted_after_end"] = True
    return summary


def say_interrupted_after_end(run: Run, pos: Position) -> None:
    last = ck.latest_checkpoint(run.run_dir)
    info(
        f"interrupted after the last step ({pos.step}/{run.total_steps}): the run is complete and saved in {last}; "
        "summary.json was not written"
    )


def check_eval_tasks(recipe: Recipe) -> None:
    """Warnings now, not surprises after hours of training: recipe keys this variant never reads, and eval.tasks
    that ``perft eval`` would refuse."""
    from perft_cli.config import ignored_keys
    from perft_cli.errors import PerftError
    from perft_cli.evaluation.testsets import resolve_tasks

    unused = ignored_keys(recipe)
    if unused:
        warn(f"set but not used by adapter.variant={recipe.adapter.variant}: {', '.join(unused)}")
    if not recipe.eval.tasks:
        return
    try:
        resolve_tasks(recipe.eval.tasks, recipe.eval.data_dir, "eval.data_dir")
    except PerftError as e:
        warn(f"eval.tasks: {e} (training goes on; fix it before perft eval)")


def log_step(run, pos, stats, seconds, metrics: MetricsLog, progress: TrainProgress, watch: CollapseWatch) -> None:
    pos.tokens += stats["tokens"]
    pos.last_loss = stats["loss"]
    top_share, events = watch.end_step(pos.step)
    pos.collapse = watch.state()
    entry = {
        "step": pos.step,
        "epoch": round(pos.progress(run.steps_per_epoch), 4),
        "loss": stats["loss"],
        "lm_loss": stats["lm_loss"],
        "base_aux_loss": stats["base_aux_loss"],
        "perft_aux_loss": stats["perft_aux_loss"],
        "lr": stats["lr"],
        "grad_norm": stats["grad_norm"],
        "tokens": stats["tokens"],
        "tokens_per_s": stats["tokens"] / max(seconds, 1e-9),
    }
    if top_share is not None:
        entry["perft_max_expert_share"] = top_share
        # NeMo's load-balance metrics of each PERFT-R router over this step's tokens (perft.load_stats).
        keys = ("util_p25", "util_median", "util_p75", "dead_fraction")
        entry["perft_load"] = [{"layer": i, **{k: round(s[k], 4) for k in keys}} for i, s in watch.loads.items()]
    progress.update(entry)
    if pos.step % run.recipe.train.log_every == 0 or pos.step == run.total_steps:
        metrics.write(entry)
    for event in events:
        metrics.write(event)
        warn_collapse(event, progress, run.recipe.train.collapse_share)


def log_eval(run: Run, pos: Position, metrics: MetricsLog, progress: TrainProgress) -> None:
    """Eval loss; a new best (after step 0) is saved as a checkpoint and named in best.json."""
    if not len(run.val_set):
        return
    if pos.step == run.total_steps:
        testing_hooks.sigint_at("final-eval")
    loss = evaluate(run)
    pos.last_eval = pos.step
    metrics.write({"step": pos.step, "epoch": round(pos.progress(run.steps_per_epoch), 4), "eval_loss": loss})
    better = pos.step > 0 and (pos.best_eval is None or loss < pos.best_eval)
    progress.note(f"step {pos.step}: eval loss {loss:.4f}" + (" (best)" if better else ""))
    if better:
        pos.best_eval, pos.best_step = loss, pos.step
        save(run, pos, best=True)


@contextmanager
def interrupt_flag():
    """SIGINT / SIGTERM set a flag: the loop finishes its step, saves and stops. A second Ctrl-C aborts."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        warn("interrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort without saving)")

    import threading

    if threading.current_thread() is not threading.main_thread():  # signals can only be handled there
        yield flag
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def finish(run: Run, pos: Position, status: str, seconds: float, train_seconds: float, tokens: int) -> dict[str, Any]:
    """The end-of-run summary (summary.json + a table) and the test hook that dumps every process's adapter."""
    from perft_cli.adapters import adapter_state
    from perft_cli.training.sharding import frozen_base_bytes

    mem, kind = peak_memory()
    last, best = ck.latest_checkpoint(run.run_dir), ck.best_checkpoint(run.run_dir)
    summary = {
        "status": status,
        "step": pos.step,
        "total_steps": run.total_steps,
        "epoch": pos.progress(run.steps_per_epoch),
        "time_s": seconds,
        "train_time_s": train_seconds,  # the optimizer steps alone: eval and checkpoint time left out
        "tokens": tokens,
        "tokens_per_s": tokens / max(train_seconds, 1e-9),  # the same measure as metrics.jsonl's per-step value
        "peak_memory_bytes": mem,
        "peak_memory_kind": kind,
        "last_loss": pos.last_loss,
        "best_eval_loss": pos.best_eval,
        "best_step": pos.best_step,
        **eval_ends(run.run_dir),
        "trainable_params": run.accounting["trainable_params"],
        "activated_params": run.accounting["activated_params"],
        "run_dir": str(run.run_dir),
        "last_checkpoint": str(last) if last else None,
        "best_checkpoint": str(best) if best else None,
        "processes": run.accelerator.num_processes,
        "sharding": run.recipe.train.sharding,
        # rank 0's frozen base: its shards, what stays whole (NF4), and the whole model's size (train.sharding: fsdp)
        "frozen_base_bytes": frozen_base_bytes(run.unwrapped) if run.sharded else None,
    }
    write_summary(run.run_dir, summary)
    if os.environ.get(testing_hooks.DUMP_ENV):
        testing_hooks.dump_adapter(adapter_state(run.unwrapped, run.attached.variant), run.accelerator.process_index)
    return summary


def eval_ends(run_dir: Path) -> dict[str, Any]:
    """The first and the last eval loss of the run (the step-0 one included), from metrics.jsonl."""
    from perft_cli.training.progress import read_metrics

    evals = [(e["step"], e["eval_loss"]) for e in read_metrics(run_dir) if "eval_loss" in e]
    first, last = (evals[0], evals[-1]) if evals else ((None, None), (None, None))
    return {
        "first_eval_step": first[0],
        "first_eval_loss": first[1],
        "last_eval_step": last[0],
        "last_eval_loss": last[1],
    }


def run_dry_run(recipe: Recipe, *, as_json: bool) -> dict[str, Any]:
    """Load the model as the recipe asks, attach the adapter, print the quantization audit and accounting, stop.

    The audit is printed before ``check_audit`` so a failing nf4 check shows what is not 4-bit.
    """
    from perft_cli.adapters import accounting, attach_adapter
    from perft_cli.modeling import load_model
    from perft_cli.quant import audit, check_audit

    model, family = load_model(recipe.model)
    attached = attach_adapter(model, recipe.adapter, family)
    result = {
        "model": recipe.model.name_or_path,
        "family": family.display,
        "variant": recipe.adapter.variant,
        **audit(model, quantization=recipe.model.quantization),
        "accounting": accounting(model, attached),
    }
    if as_json:
        print_json(result)
    elif is_main_process():
        out.print(format_audit_table(result))
        print_accounting(result["accounting"])
    check_audit(result, recipe.model.quantization)
    return result


def print_accounting(acc: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"Parameters ({acc['variant']}, {acc['moe_layers']} MoE layers)")
    t.add_column("what")
    t.add_column("parameters", justify="right")
    for label, key in (
        ("adapter trainable", "trainable_params"),
        ("adapter activated per token", "activated_params"),
        ("base total (frozen)", "base_total_params"),
        ("base activated per token", "base_activated_params"),
    ):
        t.add_row(label, f"{acc[key]:,}")
    out.print(t)


def format_audit_table(audit_dict: dict):
    """A rich Table of an audit (or estimate) dict, one row per group plus the total against bf16."""
    from rich.table import Table

    from perft_cli.quant import GROUPS

    table = Table(title=f"Model memory ({audit_dict['quantization']})")
    table.add_column("group")
    table.add_column("params", justify="right")
    table.add_column("size", justify="right")
    table.add_column("B/param", justify="right")
    table.add_column("dtypes")
    for g in GROUPS:
        row = audit_dict[g]
        if row["params"]:
            table.add_row(
                g,
                f"{row['params']:,}",
                human_bytes(row["bytes"]),
                f"{row['bytes_per_param']:.3f}",
                ", ".join(row["dtypes"]),
            )
    total, bf16 = audit_dict["total_bytes"], audit_dict["bf16_bytes"]
    table.add_section()
    table.add_row(
        "total",
        f"{audit_dict['total_params']:,}",
        human_bytes(total),
        f"{total / max(audit_dict['total_params'], 1):.3f}",
        f"{total / max(bf16, 1):.0%} of bf16 ({human_bytes(bf16)})",
    )
    return table
