"""``perft demo``: the embedded demo in one process (train, eval before and after, the routing report, one table).

The same four steps as the commands it stands for (``perft train``, ``perft eval --base``, ``perft eval``,
``perft inspect-routing``), through their own run functions and with their own output files, so the results are
theirs. One process, because on a small CPU each ``perft`` command pays 4-12 s importing torch, transformers and
accelerate before it does anything: four commands paid it four times.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Any

from perft_cli.errors import PerftError

DEFAULT_RECIPE = "demo"
# --quick, as scripts/demo.sh --quick has always meant it: 150 of the 800 steps, 40 examples per eval task and report.
QUICK_OVERRIDES = ("train.max_steps=150", "train.eval_every=50", "train.save_every=50")
QUICK_LIMIT = 40


class DemoInterrupted(Exception):
    """Training was stopped with Ctrl-C (its checkpoint is saved): the demo stops there, as ``perft train`` does.

    The message says how to go on: the run's own resolved recipe resumes it (``perft train --resume auto``).
    """

    def __init__(self, summary: dict[str, Any], run_dir: Path):
        if summary.get("status") == "interrupted":
            again = shlex.join(["perft", "train", str(run_dir / "recipe.yaml"), "--output-dir", str(run_dir)])
            said = f"interrupted at step {summary['step']}; saved {summary['last_checkpoint']}. Resume the training "
            said += f"with: {again} --resume auto"
        else:  # Ctrl-C during the final eval loss: every step is trained and saved
            said = (
                f"interrupted after the last step: the run is complete; evaluate it with: perft eval --ckpt {run_dir}"
            )
        super().__init__(said)


def recipe_path(recipe: str | Path | None) -> Path:
    """A recipe file as given, or a shipped recipe by name (``demo``, ``demo_lora``); the shipped demo by default."""
    from perft_cli.recipes import find

    if recipe is None:
        return find(DEFAULT_RECIPE)
    path = Path(recipe).expanduser()
    if path.is_file() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path  # a file (load_recipe names a missing one)
    return find(str(recipe))  # a bare name: the shipped recipe of that name, or the list of them


def check_tasks(recipe: Any, path: Path) -> None:
    """The recipe names eval tasks whose test files exist (``perft train`` only warns: it has no eval to run)."""
    from perft_cli.evaluation.testsets import resolve_tasks

    if not recipe.eval.tasks:
        raise PerftError(f"recipe {path} has no eval.tasks: the demo evaluates them before and after training")
    resolve_tasks(recipe.eval.tasks, recipe.eval.data_dir, "eval.data_dir")


def default_run_dir(recipe: Path) -> Path:
    """``runs/demo-<recipe>-<time>``: a fresh run directory per demo, as scripts/demo.sh has always named them."""
    return Path("runs") / f"demo-{recipe.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_demo(
    recipe: str | Path | None = None,
    *,
    quick: bool = False,
    overrides: list[str] | None = None,
    output_dir: Path | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Train, evaluate the frozen and the adapted model, report routing; return the paths and both accuracies.

    ``limit`` caps the examples of each eval task and of the routing report (``--quick``: 40). Raises
    ``DemoInterrupted`` when training was stopped.
    """
    from perft_cli.config import load_recipe
    from perft_cli.console import info

    path = recipe_path(recipe)
    sets = [*(QUICK_OVERRIDES if quick else ()), *(overrides or [])]  # --set after --quick: the user's word wins
    limit = limit or (QUICK_LIMIT if quick else None)
    loaded = load_recipe(path, sets)  # a bad recipe or --set fails here, before torch is imported
    run_dir = Path(output_dir) if output_dir is not None else default_run_dir(path)
    loaded = loaded.model_copy(update={"output_dir": str(run_dir)})
    check_tasks(loaded, path)  # the evals' test files: found now, not after the training
    outputs = {
        "before": run_dir / "eval" / "before.json",
        "after": run_dir / "eval" / "after.json",
        "routing_json": run_dir / "routing.json",
        "routing_html": run_dir / "routing.html",
    }

    # Read when OpenMP starts (torch's import), so set before it: scripts/demo.sh says why (same numbers, and no 10x
    # slowdown when another process holds a core).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # torch, transformers and accelerate from here on, imported once for all four steps.
    from perft_cli.evaluate import run_eval
    from perft_cli.inspect_routing import run_inspect
    from perft_cli.train import run_train

    info(f"== 1/4 train {path} -> {run_dir}")
    summary = run_train(loaded)
    if summary.get("status") == "interrupted" or summary.get("interrupted_after_end"):
        raise DemoInterrupted(summary, run_dir)
    info("== 2/4 evaluate the frozen model (before)")
    before = run_eval(ckpt=run_dir, base=True, json_path=outputs["before"], limit=limit)
    info("== 3/4 evaluate with the trained adapter (after)")
    after = run_eval(ckpt=run_dir, json_path=outputs["after"], limit=limit)
    info("== 4/4 routing before/after fine-tuning")
    run_inspect(run_dir, limit=limit, json_path=outputs["routing_json"], html_path=outputs["routing_html"])
    accuracy = {
        task: {"before": before["tasks"][task]["accuracy"], "after": result["accuracy"]}
        for task, result in after["tasks"].items()
    }
    return {"run_dir": str(run_dir), "files": {k: str(v) for k, v in outputs.items()}, "accuracy": accuracy}


def format_table(result: dict[str, Any]) -> str:
    """The before/after accuracy table scripts/demo.sh has always printed, and where the files are."""
    lines = ["", f"{'task':<14}{'before':>9}{'after':>9}"]
    for task, acc in result["accuracy"].items():
        lines.append(f"{task:<14}{acc['before']:>9.1%}{acc['after']:>9.1%}")
    run = result["run_dir"]
    lines += [
        "",
        f"results in {run}/: eval/before.json, eval/after.json (+ .examples.jsonl), routing.html, metrics.jsonl",
    ]
    return "\n".join(lines)
