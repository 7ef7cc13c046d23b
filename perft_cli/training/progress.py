"""What a training run shows and records: the progress bar, metrics.jsonl, trackers, collapse warnings, the summary.

Everything printed goes through rank 0 only (``console.is_main_process``); every number that matters is also
written to ``metrics.jsonl`` / ``summary.json`` in the run directory. Nothing here touches the model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from perft_cli.console import err, human_bytes, human_count, is_main_process, out, warn
from perft_cli.training.collapse import COLLAPSE_STEPS

METRICS_FILE = "metrics.jsonl"
PLAIN_EVERY_S = 30.0  # a log file (no terminal) gets a progress line at least this often
SUMMARY_FILE = "summary.json"


class MetricsLog:
    """Appends one JSON object per line to ``RUN/metrics.jsonl`` (rank 0) and forwards scalars to trackers."""

    def __init__(self, run_dir: Path, accelerator=None, keep_until: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.accelerator = accelerator
        self.main = is_main_process()
        if self.main and keep_until is not None:
            truncate_metrics(self.path, keep_until)
        elif self.main and keep_until is None:
            self.path.write_text("")  # a fresh run starts a fresh log

    def write(self, entry: dict[str, Any]) -> None:
        if not self.main:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            scalars = {k: v for k, v in entry.items() if isinstance(v, int | float) and k != "step"}
            self.accelerator.log(scalars, step=entry["step"])


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the entries after ``step``: a resumed run rewrites what the interrupted run logged past its checkpoint."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by a kill
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class TrainProgress:
    """A rich progress bar on stderr (rank 0): step, epoch, losses, lr, tokens/s, ETA.

    When stderr is not a terminal (CI logs, pipes, a file) it prints a plain line instead, every ~5% of the steps
    and at least every ``PLAIN_EVERY_S`` seconds, with the ETA from this session's average step time.
    """

    def __init__(self, total: int, start: int):
        self.total, self.start = total, start
        self.main = is_main_process()
        self.live = self.main and err.is_terminal
        self.every = max(1, total // 20)
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=err,
                transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, entry: dict[str, Any]) -> None:
        if not self.main:
            return
        text = step_text(entry)
        if self.bar is not None:
            self.bar.update(self.task, completed=entry["step"], info=text)
            return
        now, step = time.monotonic(), entry["step"]
        if step % self.every == 0 or step == self.total or now - self.last_line >= PLAIN_EVERY_S:
            self.last_line = now
            eta = eta_text((now - self.started) / max(step - self.start, 1) * (self.total - step))
            err.print(f"step {step}/{self.total} {text} ETA {eta}", highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        """A line above the bar (eval results, warnings)."""
        if self.main:
            (self.bar.console if self.bar is not None else err).print(message, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def eta_text(seconds: float) -> str:
    """Remaining time as H:MM:SS (M:SS under an hour)."""
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def step_text(e: dict[str, Any]) -> str:
    aux = "".join(
        f"{name} {e[key]:.3f} "
        for name, key in (("aux", "base_aux_loss"), ("perft-aux", "perft_aux_loss"))
        if e.get(key) is not None
    )
    return (
        f"ep {e['epoch']:.2f} loss {e['loss']:.4f} lm {e['lm_loss']:.4f} {aux}"
        f"lr {e['lr']:.2e} {e['tokens_per_s']:,.0f} tok/s"
    )


def print_start(info: dict[str, Any]) -> None:
    """The setup in a few lines, the aux-loss coefficients in use first (users ask why aux losses seem off)."""
    if not is_main_process():
        return
    base = info["base_aux_coef"]
    base_text = "none (this family returns no aux loss)" if base is None else f"{base:g} ({info['base_aux_source']})"
    perft = info["perft_aux_coef"]
    err.print(
        f"[bold]aux losses:[/] base router {base_text}; PERFT router "
        + (f"{perft:g} (adapter.router_aux_loss_coef)" if perft is not None else "none (no PERFT router)"),
        soft_wrap=True,
    )
    err.print(
        f"[bold]model:[/] {info['model']} ({info['family']}, {info['dtype']}, {info['quantization']}); "
        f"[bold]adapter:[/] {info['variant']}, {human_count(info['trainable_params'])} trainable, "
        f"{human_count(info['activated_params'])} activated per token",
        soft_wrap=True,
    )
    err.print(
        f"[bold]data:[/] {info['train_examples']:,} train / {info['val_examples']:,} held out from {info['source']}; "
        f"{info['steps_per_epoch']} steps/epoch, {info['total_steps']} steps, batch {info['batch_size']} = "
        f"{info['micro_batch_size']} x {info['accumulation']} accumulation x {info['processes']} process(es)"
        + ("; frozen base sharded across them (FSDP2)" if info.get("sharding") == "fsdp" else ""),
        soft_wrap=True,
    )
    if info.get("resumed_from"):
        err.print(f"[bold]resumed[/] from {info['resumed_from']} at step {info['start_step']}", soft_wrap=True)


def _sharding_row(summary: dict[str, Any]) -> list[tuple[str, str]]:
    base = summary.get("frozen_base_bytes")
    if not base:
        return []
    held = base["sharded"] + base["replicated"]
    replicated = f"; {human_bytes(base['replicated'])} of it whole on every rank: NF4" if base["replicated"] else ""
    return [("frozen base", f"{human_bytes(held)} of {human_bytes(base['full'])} on rank 0 (FSDP2{replicated})")]


def peak_memory() -> tuple[int, str]:
    """(bytes, what): CUDA max allocated on this process's device, else the process's max resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(), "CUDA max allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS"  # Linux reports KiB


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json in the run dir and a one-screen table on stdout (rank 0)."""
    if not is_main_process():
        return
    (Path(run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    from rich.table import Table

    t = Table(title=f"perft train: {summary['status']}", show_header=False)
    t.add_column("what")
    t.add_column("value")
    best = summary.get("best_eval_loss")
    rows = [
        ("steps", f"{summary['step']}/{summary['total_steps']} (epoch {summary['epoch']:.2f})"),
        ("time", f"{summary['time_s']:.1f} s this session ({summary['train_time_s']:.1f} s in training steps)"),
        ("throughput", f"{summary['tokens_per_s']:,.0f} tokens/s ({summary['tokens']:,} tokens this session)"),
        ("peak memory", f"{human_bytes(summary['peak_memory_bytes'])} ({summary['peak_memory_kind']})"),
        ("last loss", f"{summary['last_loss']:.4f}" if summary.get("last_loss") is not None else "-"),
        ("eval loss", _evals(summary)),
        ("best eval loss", f"{best:.4f} at step {summary['best_step']}" if best is not None else _no_best(summary)),
        (
            "parameters",
            f"{summary['trainable_params']:,} trainable, {summary['activated_params']:,} activated per token",
        ),
        ("run directory", summary["run_dir"]),
        *_sharding_row(summary),
        ("last checkpoint", summary.get("last_checkpoint") or "-"),
        ("best checkpoint", summary.get("best_checkpoint") or "-"),
    ]
    for row in rows:
        t.add_row(*row)
    out.print(t)


def _evals(summary: dict[str, Any]) -> str:
    first, last = summary.get("first_eval_loss"), summary.get("last_eval_loss")
    if first is None:
        return "- (no eval: data.val_size is 0)"
    text = f"{first:.4f} at step {summary['first_eval_step']}"
    if summary["last_eval_step"] != summary["first_eval_step"]:
        text += f" -> {last:.4f} at step {summary['last_eval_step']}"
    return text


def _no_best(summary: dict[str, Any]) -> str:
    if summary.get("first_eval_loss") is None:
        return "- (no eval)"
    return "- (no eval after training began; see the eval loss above)"


def warn_collapse(event: dict[str, Any], progress: TrainProgress, share: float) -> None:
    message = (
        f"PERFT router of layer {event['layer']} has collapsed: expert {event['expert']} takes "
        f"{event['share']:.0%} of the tokens for {COLLAPSE_STEPS}+ steps (threshold train.collapse_share={share}); "
        "consider a larger adapter.router_aux_loss_coef"
    )
    progress.note(f"[yellow]warning:[/] {message}") if progress.live else warn(message)


class Timer:
    """Wall time of this session and of the last step."""

    def __init__(self):
        self.start = self.last = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.last = now - self.last, now
        return dt

    def total(self) -> float:
        return time.perf_counter() - self.start
