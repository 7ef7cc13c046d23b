"""The ``perft`` command line: each command parses its options, calls one run_* function and prints the result.

User errors (PerftError) and command-line usage errors (unknown option or command, a bad or missing option value)
print as one line on stderr with exit code 1; set PERFT_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from perft_cli.errors import PerftError


def _debug() -> bool:
    return os.environ.get("PERFT_DEBUG", "") not in ("", "0")


def _print_error(message: str) -> None:
    """The one ``error: ...`` line on stderr."""
    from rich.markup import escape

    from perft_cli.console import err

    # Escaped: messages hold paths and hints like "pip install 'perft-cli[plot]'" that are not markup.
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)


def _click_error_types() -> tuple[type[Exception], ...]:
    """Click's exception base: typer >= 0.2x vendors Click (typer.TyperException), older typer uses click itself."""
    found: list[type[Exception]] = []
    if hasattr(typer, "TyperException"):
        found.append(typer.TyperException)
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)


_CLICK_ERRORS = _click_error_types()


def _usage_error(e: Exception, command: str | None = None) -> typer.Exit:
    """Print a Click usage error (bad option value, unknown option or command, missing argument) as one line.

    ``command`` names the subcommand being parsed, for errors that do not carry their context.
    """
    message = " ".join(e.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
    message = re.sub(r"\. Did you mean (.+)\?$", r" (did you mean \1?)", message)
    if len(message) > 1 and message[0].isupper() and message[1].islower():
        message = message[0].lower() + message[1:]  # "No such option" -> "no such option", like every error line
    names: list[str] = []
    ctx = getattr(e, "ctx", None)  # a UsageError knows the command it was raised for
    if ctx is None and command:
        names = [command]
    while ctx is not None and ctx.parent is not None:  # the root's info_name is the program ("python -m ...")
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    _print_error(f"{message}; see '{' '.join(['perft', *names, '--help'])}'")
    return typer.Exit(1)


class _OneLineErrors(TyperGroup):
    """Usage errors as one ``error:`` line with exit code 1 (Click's default: a boxed panel, exit code 2).

    Covers the group's own options (make_context) and each command's (parsed inside invoke). A bare ``perft``
    (NoArgsIsHelpError) still prints the help, and --help / --version still exit 0.
    """

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _CLICK_ERRORS as e:
            if _debug() or type(e).__name__ == "NoArgsIsHelpError":  # a bare `perft`: the help, as before
                raise
            raise _usage_error(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _CLICK_ERRORS as e:
            if _debug() or type(e).__name__ == "NoArgsIsHelpError":  # a bare `perft`: the help, as before
                raise
            raise _usage_error(e, ctx.invoked_subcommand) from None


app = typer.Typer(
    name="perft",
    cls=_OneLineErrors,
    help="Parameter-Efficient Routed Fine-Tuning (PERFT) for Mixture-of-Experts language models.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        from perft_cli import __version__

        typer.echo(f"perft {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Parameter-Efficient Routed Fine-Tuning (PERFT) for Mixture-of-Experts language models."""


def user_errors(fn: Callable) -> Callable:
    """Print a PerftError as one line on stderr and exit 1 (the traceback only with PERFT_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PerftError as e:
            if _debug():
                raise
            _print_error(str(e))
            raise typer.Exit(1) from None

    return wrapper


RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe (see recipes/README.md).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a recipe key, e.g. --set adapter.top_k=4 (repeatable). "
        "VALUE is YAML (4, true, \\[a, b], null); text keys (paths, names, output_dir) take it literally, "
        "null meaning none.",
        show_default=False,
    ),
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
        Path | None, typer.Option("--output-dir", help="Run directory (overrides the recipe; taken literally).")
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
    """Fine-tune the recipe's adapter on its data. Checkpoints and metrics.jsonl go to the run directory.

    Ctrl-C finishes the current step, saves a checkpoint and exits with code 130; --resume auto continues it.
    """
    from perft_cli.config import load_recipe

    if json_ and not dry_run:
        raise PerftError("--json only applies with --dry-run (training writes metrics.jsonl and summary.json)")
    if resume is not None and dry_run:
        raise PerftError("--resume does not apply with --dry-run (a dry run trains nothing); drop one of them")
    loaded = load_recipe(recipe, list(set_ or []))
    if output_dir is not None:  # a path as given: not YAML ("run #2", "2024" and "yes" are directory names)
        loaded = loaded.model_copy(update={"output_dir": str(output_dir)})
    from perft_cli.console import info
    from perft_cli.train import run_train  # torch and transformers: only once the recipe is known to be right

    result = run_train(loaded, resume=resume, dry_run=dry_run, as_json=json_)
    if result.get("status") == "interrupted":
        again = ["perft", "train", str(recipe)]
        for o in set_ or []:
            again += ["--set", o]
        if output_dir is not None:
            again += ["--output-dir", str(output_dir)]
        saved = result["last_checkpoint"]
        hint = shlex.join([*again, "--resume", "auto"])  # quoted, so it can be pasted into a shell as it is
        info(f"interrupted at step {result['step']}; saved {saved}. Resume with: {hint}")
        raise typer.Exit(130)
    if result.get("interrupted_after_end"):
        info(f"interrupted after the last step: the run is complete; saved {result['last_checkpoint']}")
        raise typer.Exit(130)


@app.command()
@user_errors
def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    world_size: Annotated[
        int | None,
        typer.Option("--world-size", min=1, help="train.sharding: fsdp: processes in all (per-rank memory)."),
    ] = None,
) -> None:
    """Count parameters (trainable, activated per token, total) and estimate training memory from config.json alone."""
    from perft_cli.config import load_recipe

    loaded = load_recipe(recipe, list(set_ or []))
    from perft_cli.console import print_json
    from perft_cli.plan import print_plan, run_plan  # torch and transformers: only once the recipe is right

    result = run_plan(loaded, world_size)
    print_json(result) if json_ else print_plan(result)


@app.command("eval")
@user_errors
def eval_(
    ckpt: Annotated[Path | None, typer.Option("--ckpt", help="Run or checkpoint directory to evaluate.")] = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="Comma-separated task names (default: the recipe's eval.tasks).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Folder with <task>/test.json files (LLM-Adapters layout).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Use only the first N examples per task.")
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="Evaluate the frozen model without adapters.")] = False,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Results JSON (default: RUN/eval/...json); per-example .examples.jsonl beside."),
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="With --base and no --ckpt: the recipe naming the model.")
    ] = None,
    set_: SetOpt = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Prompts per generation batch (eval.batch_size).")
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", min=1, help="For every task (default: 4 commonsense, 256 arithmetic)."),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="generation: the paper's protocol. lm-eval: lm-evaluation-harness log-likelihood scoring "
            "(not comparable; needs the lm-eval extra: pip install 'perft-cli\\[lm-eval]').",
        ),
    ] = "generation",
    lm_eval_include: Annotated[
        Path | None,
        typer.Option(
            "--lm-eval-include",
            help="With --mode lm-eval: a folder of lm-eval task YAMLs (e.g. demo/lm_eval), indexed with lm-eval's "
            "own tasks; without --tasks, every task defined in it.",
        ),
    ] = None,
) -> None:
    """Evaluate with the paper's protocol (LLM-Adapters prompts, 4-beam search, exact answer extraction)."""
    from perft_cli.evaluate import run_eval

    overrides = list(set_ or [])
    if max_new_tokens is not None:
        overrides.append(f"eval.max_new_tokens={max_new_tokens}")
    run_eval(
        ckpt=ckpt,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        data_dir=data_dir,
        limit=limit,
        base=base,
        json_path=json_path,
        recipe_path=recipe,
        overrides=overrides,
        batch_size=batch_size,
        mode=mode,
        lm_eval_include=lm_eval_include,
    )


@app.command()
@user_errors
def merge(
    ckpt: CkptOpt,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the self-contained model to.")],
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out directory.")] = False,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="Dtype of the exported base: bfloat16, float16 or float32 (default: the run's)."),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option("--format", help="model (default), or peft: the LoRA baseline as a peft adapter folder."),
    ] = "model",
    collapse: Annotated[
        bool,
        typer.Option("--collapse", help="PERFT-D (lora form): ship its N experts as one exact expert of rank N*r."),
    ] = False,
) -> None:
    """Fold (LoRA) or export (PERFT) the trained adapters with the base into one verified model directory."""
    from perft_cli.merge import run_merge

    run_merge(ckpt=ckpt, out=out, force=force, dtype=dtype, fmt=fmt, collapse=collapse)


@app.command("inspect-routing")
@user_errors
def inspect_routing(
    ckpt: CkptOpt,
    data: Annotated[
        Path | None, typer.Option("--data", help="Dataset file, JSON or JSONL (default: the run's validation split).")
    ] = None,
    limit: LimitOpt = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every number as JSON here.")] = None,
    html_path: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report here.")] = None,
    png_path: Annotated[Path | None, typer.Option("--png", help="Write a figure here (needs matplotlib).")] = None,
    collapse_share: Annotated[
        float,
        typer.Option("--collapse-share", min=0.0, max=1.0, help="Alarm when one PERFT expert takes this load share."),
    ] = 0.5,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Examples per forward pass.")] = 8,
) -> None:
    """Show how tokens are routed among the experts, before and after fine-tuning, per MoE layer."""
    from perft_cli.inspect_routing import run_inspect

    run_inspect(
        ckpt=ckpt,
        data=data,
        limit=limit,
        json_path=json_path,
        html_path=html_path,
        png_path=png_path,
        batch_size=batch_size,
        collapse_share=collapse_share,
    )


@app.command()
@user_errors
def generate(
    ckpt: CkptOpt,
    prompt: Annotated[str, typer.Option("--prompt", help="The question or instruction to answer.")],
    input_text: Annotated[
        str, typer.Option("--input", help="The template's optional Input field (context for the instruction).")
    ] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate at most.")] = 128,
    base: Annotated[
        bool, typer.Option("--base", help="Also answer with the frozen model, beside the adapted one.")
    ] = False,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the prompt as it is, without the paper's template.")
    ] = False,
) -> None:
    """Answer a prompt with the trained model (the paper's prompt template and beam search, as perft eval does)."""
    from perft_cli.generate import print_answers, run_generate

    print_answers(run_generate(ckpt, prompt, input_text=input_text, max_new_tokens=max_new_tokens, base=base, raw=raw))


@app.command()
@user_errors
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe, its model's config and tokenizer, every training record and the eval test files, in seconds
    and without loading weights; print what was checked."""
    from perft_cli.config import load_recipe

    loaded = load_recipe(recipe, list(set_ or []))
    from perft_cli.validate import print_checks, run_validate

    print_checks(run_validate(loaded))


@app.command()
@user_errors
def demo(
    recipe: Annotated[
        str | None,
        typer.Argument(help="A recipe file, or a shipped recipe's name (default: demo).", show_default=False),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="150 training steps instead of 800; 40 examples per eval task and in the routing report."
        ),
    ] = False,
    set_: SetOpt = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Run directory (default: runs/demo-RECIPE-TIME).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Examples per eval task and in the routing report.")
    ] = None,
) -> None:
    """Train, evaluate before and after, and report routing on the tiny demo MoE, in one process (CPU, no hub).

    The same steps and output files as perft train, perft eval --base, perft eval and perft inspect-routing.
    """
    from perft_cli.demo import DemoInterrupted, format_table, run_demo

    try:
        result = run_demo(recipe, quick=quick, overrides=list(set_ or []), output_dir=output_dir, limit=limit)
    except DemoInterrupted as e:
        from perft_cli.console import info

        info(str(e))
        raise typer.Exit(130) from None
    typer.echo(format_table(result))


recipes_app = typer.Typer(
    cls=_OneLineErrors,
    help="The recipes shipped with perft: list them, or copy one to edit.",
    invoke_without_command=True,
    add_completion=False,
)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback()
def _recipes(ctx: typer.Context) -> None:
    """List the shipped recipes, one line each (perft recipes copy NAME DEST writes one to edit)."""
    if ctx.invoked_subcommand is not None:
        return
    from perft_cli.console import out
    from perft_cli.recipes import shipped, summary

    found = shipped()
    width = max(map(len, found))
    for name, path in found.items():
        out.print(f"{name:<{width}}  {summary(path)}", markup=False, highlight=False, soft_wrap=True)


@recipes_app.command("copy")
@user_errors
def recipes_copy(
    name: Annotated[str, typer.Argument(help="A shipped recipe (see: perft recipes).", show_default=False)],
    dest: Annotated[Path, typer.Argument(help="The file to write (or a folder for NAME.yaml).", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace DEST if it exists.")] = False,
) -> None:
    """Write a shipped recipe to DEST to edit; its local paths are made absolute so it works from there."""
    from perft_cli.console import info
    from perft_cli.recipes import copy_recipe

    written = copy_recipe(name, dest, force=force)
    info(f"wrote {written}; check it with: perft validate {written}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
