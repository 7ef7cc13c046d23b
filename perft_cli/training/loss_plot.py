"""``RUN/loss.png``: the run's curves, redrawn from metrics.jsonl while training goes (at most every
``EVERY_S`` seconds, and at the end), written whole (a viewer never sees half a file).

Four panels: the training loss and its LM part with the eval loss, the base router's and the PERFT router's aux
losses, and the learning rate. matplotlib is optional (``pip install 'perft-cli[plot]'``); without it the run says
so once and writes no picture.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

LOSS_FILE = "loss.png"
EVERY_S = 30.0  # a redraw costs ~0.2-0.5 s on a CPU


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class LossPlot:
    """Redraws ``RUN/loss.png`` from the metrics log (rank 0 only; the caller decides)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / LOSS_FILE
        self.enabled = enabled and have_matplotlib()
        self.last = 0.0

    def update(self, force: bool = False) -> None:
        """Redraw if ``EVERY_S`` seconds have passed since the last time (or ``force``)."""
        if not self.enabled or (not force and time.monotonic() - self.last < EVERY_S):
            return
        from perft_cli.training.progress import read_metrics

        self.last = time.monotonic()
        render(read_metrics(self.path.parent), self.path)


def _series(entries: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in entries if isinstance(e.get(key), int | float) and "event" not in e]
    return [s for s, _ in points], [v for _, v in points]


def render(entries: list[dict[str, Any]], path: Path) -> None:
    """Draw the four panels into ``path`` (a temporary file beside it, renamed: written whole)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from perft_cli.outputs import atomic_file

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    (loss, lm), (aux, lr) = fig.subplots(2, 2, sharex=True)
    for ax, keys, title in (
        (loss, ("loss", "eval_loss"), "loss (train) and eval loss (held out, LM only)"),
        (lm, ("lm_loss", "eval_loss"), "LM loss (train) and eval loss"),
        (aux, ("base_aux_loss", "perft_aux_loss"), "aux losses (base router, PERFT router)"),
        (lr, ("lr",), "learning rate"),
    ):
        for key in keys:
            steps, values = _series(entries, key)
            if steps:
                style = {"marker": "o", "linestyle": "--"} if key == "eval_loss" else {}
                ax.plot(steps, values, label=key, **style)
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in (aux, lr):
        ax.set_xlabel("optimizer step")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
