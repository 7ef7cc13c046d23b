"""The ``perft`` command line: each command parses its options, calls one run_* function and prints the result.

User errors (PerftError) print as one line on stderr with exit code 1; set PERFT_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from perft_cli.errors import PerftError

app = typer.Typer(
    name="perft",
    help="Parameter-Efficient Routed Fine-Tuning (PERFT) for Mixture-of-Experts language models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _debug() -> bool:
    return os.environ.get("PERFT_DEBUG", "") not in ("", "0")


def user_errors(fn: Callable) -> Callable:
    """Print a PerftError as one line on stderr and exit 1 (the traceback only with PERFT_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PerftError as e:
            if _debug():
                raise
            from perft_cli.console import err

            err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe (see recipes/README.md).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe key, e.g. --set adapter.top_k=4 (repeatable).", show_default=False),
]
CkptOpt = Annotated[
    Path, typer.Option("--ckpt", help="Run directory (its best or latest checkpoint) or a checkpoint directory.")
]
LimitOpt = Annotated[int | None, typer.Option("--limit", min=1, help="Use only the first N examples.")]


@app.command()
@user_errors
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Run directory (overrides the recipe).")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="'auto' (newest complete checkpoint) or a checkpoint dir."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Load the model, attach adapters, print the quantization audit, stop.")
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="With --dry-run: print the audit as JSON on stdout.")] = False,
) -> None:
    """Fine-tune the recipe's adapter on its data. Checkpoints and metrics.jsonl go to the run directory."""
    from perft_cli.config import load_recipe
    from perft_cli.train import run_train

    overrides = list(set_ or [])
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    run_train(load_recipe(recipe, overrides), resume=resume, dry_run=dry_run, as_json=json_)


@app.command()
@user_errors
def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Count parameters (trainable, activated per token, total) and estimate training memory from config.json alone."""
    from perft_cli.config import load_recipe
    from perft_cli.console import print_json
    from perft_cli.plan import run_plan
    from perft_cli.report import print_plan

    result = run_plan(load_recipe(recipe, list(set_ or [])))
    print_json(result) if json_ else print_plan(result)


@app.command("eval")
@user_errors
def eval_(
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="Run or checkpoint directory to evaluate.")] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help="Comma-separated task names.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Folder with <task>/test.json files (LLM-Adapters layout).")
    ] = None,
    limit: LimitOpt = None,
    base: Annotated[bool, typer.Option("--base", help="Evaluate the frozen model without adapters.")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results JSON here.")] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="With --base and no --ckpt: the recipe naming the model.")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate with the paper's protocol (LLM-Adapters prompts, 4-beam search, exact answer extraction)."""
    from perft_cli.evaluate import run_eval

    run_eval(
        ckpt=ckpt,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        data_dir=data_dir,
        limit=limit,
        base=base,
        json_path=json_path,
        recipe_path=recipe,
        overrides=list(set_ or []),
    )


@app.command()
@user_errors
def merge(
    ckpt: CkptOpt,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the self-contained model to.")],
) -> None:
    """Fold (LoRA) or export (PERFT) the trained adapters with the base into one verified model directory."""
    from perft_cli.merge import run_merge

    run_merge(ckpt=ckpt, out=out)


@app.command("inspect-routing")
@user_errors
def inspect_routing(
    ckpt: CkptOpt,
    data: Annotated[Path | None, typer.Option("--data", help="Dataset file (default: validation split).")] = None,
    limit: LimitOpt = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every number as JSON here.")] = None,
    html_path: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report here.")] = None,
    png_path: Annotated[Path | None, typer.Option("--png", help="Write a figure here (needs matplotlib).")] = None,
) -> None:
    """Show how tokens are routed among the experts, before and after fine-tuning, per MoE layer."""
    from perft_cli.inspect_routing import run_inspect

    run_inspect(ckpt=ckpt, data=data, limit=limit, json_path=json_path, html_path=html_path, png_path=png_path)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
