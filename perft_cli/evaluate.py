"""``perft eval``: the paper's evaluation protocol (method.md), batched, plus an lm-evaluation-harness mode.

Generation protocol: the LLM-Adapters evaluation prompt byte for byte (``prompts.eval_prompt``), deterministic 4-beam
search, 4 new tokens for commonsense and 256 for arithmetic, the text after the last "### Response:", and the exact
extraction rules of ``tasks.extract_answer``, generated in batches (``generation``). Results go to a JSON file (with
the protocol settings, recipe and checkpoint) and a JSON Lines file with every example; the rich table on stdout is
presentation only. ``--mode lm-eval`` hands the loaded model to lm-evaluation-harness instead (``harness``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from perft_cli import dist_version
from perft_cli.errors import PerftError
from perft_cli.evaluation import lm_eval_mode
from perft_cli.evaluation.generation import GENERATION, evaluate_task
from perft_cli.evaluation.tasks import (
    ARITHMETIC,
    ARITHMETIC_TASKS,
    COMMONSENSE,
    COMMONSENSE_TASKS,
    TASKS,
    Task,
    extract_answer,
)
from perft_cli.evaluation.testsets import load_records, resolve_tasks
from perft_cli.outputs import atomic_file, check_output_file
from perft_cli.prompts import eval_prompt

__all__ = ["extract_answer", "run_eval"]  # extract_answer: the entry point interface.md names

PROMPT_TEMPLATE = "llm-adapters-eval"  # prompts.eval_prompt; its bytes are hashed into the results JSON
PROTOCOL_BEAMS = 4  # method.md: 4-beam search


# --- the command -----------------------------------------------------------------------------------------------


def run_eval(
    *,
    ckpt: str | Path | None = None,
    tasks: list[str] | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    base: bool = False,
    json_path: str | Path | None = None,
    recipe_path: str | Path | None = None,
    overrides: list[str] | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    mode: str = "generation",
    lm_eval_include: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (or the frozen base) and write the results JSON (+ per-example JSON Lines)."""
    if mode not in ("generation", "lm-eval"):
        raise PerftError(f"--mode {mode!r}: expected 'generation' (the paper's protocol) or 'lm-eval'")
    if mode == "lm-eval":
        lm_eval_mode.require_lm_eval()  # before minutes of model loading
        if data_dir is not None:
            raise PerftError(
                "--data-dir holds LLM-Adapters test files for the generation protocol; lm-eval reads each task's own "
                "data (local task YAMLs: --lm-eval-include DIR)"
            )
    elif lm_eval_include is not None:
        raise PerftError("--lm-eval-include only applies with --mode lm-eval")
    recipe, ckpt_path = _recipe(ckpt, recipe_path, base, overrides or [])
    # Both output files are checked before any slow work (hub data, the model); written only once all is done.
    json_file = Path(json_path).expanduser() if json_path else _default_json(ckpt_path, recipe, base, mode)
    examples_file = json_file.with_name(json_file.stem + ".examples.jsonl")
    fix = "choose another path with --json FILE"
    check_output_file(json_file, "--json" if json_path else "the results file", fix)
    check_output_file(examples_file, "the per-example file", fix)
    cfg = recipe.eval
    limit = limit or cfg.limit
    batch_size = batch_size or cfg.batch_size
    max_new_tokens = max_new_tokens or cfg.max_new_tokens  # None: each task's default
    if mode == "lm-eval" and not tasks and lm_eval_include is not None:
        names = lm_eval_mode.local_tasks(lm_eval_include)  # --lm-eval-include DIR alone: every task defined there
    else:
        names = tasks or cfg.tasks or _default_tasks(recipe, mode)
    data_option = "--data-dir" if data_dir is not None else "eval.data_dir"
    data_dir = data_dir or cfg.data_dir
    if mode == "generation":  # read (and check) the data before loading the model
        loaded = [load_records(t, folder, data_dir) for t, folder in resolve_tasks(names, data_dir, data_option)]
    else:  # find the lm-eval tasks before loading the model
        lm_tasks = lm_eval_mode.task_manager(names, lm_eval_include)
    try:
        from perft_cli.modeling import load_trained  # torch and transformers: once the arguments are known right

        with atomic_file(json_file) as json_tmp, atomic_file(examples_file) as examples_tmp:
            model, tokenizer, recipe, _, _ = load_trained(ckpt_path, base=base, recipe=recipe)
            _place(model)
            started = time.time()
            if mode == "lm-eval":
                lm_batch = batch_size or lm_eval_mode.BATCH_SIZE
                result = lm_eval_mode.run_lm_eval(
                    model, tokenizer, *lm_tasks, examples_tmp, batch_size=lm_batch, limit=limit
                )
            else:
                settings = dict(
                    batch_size=batch_size, batch_tokens=cfg.batch_tokens, num_beams=cfg.num_beams,
                    max_new_tokens=max_new_tokens,
                )  # fmt: skip
                backbone = (recipe.model.quantization, recipe.model.dtype)
                result = _run_generation(
                    model, tokenizer, loaded, examples_tmp, limit=limit, backbone=backbone, **settings
                )
            result["examples_file"] = str(examples_file)
            result.update(
                checkpoint=str(ckpt_path) if ckpt_path else None,
                adapted=not base,
                model=recipe.model.name_or_path,
                quantization=recipe.model.quantization,
                limit=limit,
                seconds=round(time.time() - started, 2),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                versions=_versions(),
                recipe=recipe.model_dump(mode="json"),
            )
            json_tmp.write_text(json.dumps(result, indent=2) + "\n")
    except KeyboardInterrupt:
        from perft_cli.console import info

        # The temporary files are gone by now; the CLI turns KeyboardInterrupt into exit code 130.
        said = f"interrupted: the evaluation did not finish, so nothing was written to {json_file} or {examples_file}"
        info(said)
        raise
    result["json_file"] = str(json_file)
    _print_table(result)
    from perft_cli.console import info

    info(f"results: {json_file}\nper-example outputs: {examples_file}")
    return result


def _with_progress(model, tokenizer, task: Task, records: list[dict], **kwargs: Any) -> list[dict]:
    """``evaluate_task`` under a rich progress bar (stderr, rank 0) that shows the running accuracy."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from perft_cli.console import err, is_main_process

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}"),
    )
    with Progress(*columns, TimeRemainingColumn(), console=err, disable=not is_main_process()) as progress:
        bar = progress.add_task(f"{task.name:<13}", total=len(records), acc="-")  # aligned: ARC-Challenge

        def update(done: int, correct: int) -> None:
            progress.update(bar, completed=done, acc=f"{100 * correct / done:.1f}%")

        return evaluate_task(model, tokenizer, task, records, on_batch=update, **kwargs)


def _run_generation(
    model,
    tokenizer,
    loaded,
    examples_file: Path,
    *,
    limit,
    backbone,
    batch_size,
    batch_tokens,
    num_beams,
    max_new_tokens,
):
    from perft_cli.console import warn

    per_task: dict[str, dict] = {}
    max_tokens: dict[str, int] = {}
    with examples_file.open("w") as fh:
        for task, records, path in loaded:
            if task.expected and len(records) != task.expected:
                warn(f"{path} has {len(records)} examples; the paper's {task.name} test set has {task.expected}")
            full = len(records)
            records = records[:limit] if limit else records
            max_tokens[task.name] = max_new_tokens or task.max_new_tokens
            started = time.time()
            rows = _with_progress(
                model, tokenizer, task, records, batch_size=batch_size, batch_tokens=batch_tokens,
                num_beams=num_beams, max_new_tokens=max_tokens[task.name],
            )  # fmt: skip
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            n, correct = len(rows), sum(r["correct"] for r in rows)
            seconds = time.time() - started
            complete = n == full and n == (task.expected or n)
            why = _backbone_differs(*backbone) + _not_comparable(
                task, complete, path, num_beams, max_tokens[task.name]
            )
            per_task[task.name] = dict(
                kind=task.kind, examples=n, correct=correct, accuracy=correct / n, expected_examples=task.expected,
                complete=complete, comparable=not why, not_comparable_because=why, custom=task.custom,
                data_file=str(path), data_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                seconds=round(seconds, 2),
                examples_per_s=round(n / seconds, 3) if seconds else None,
            )  # fmt: skip
    comparable = all(t["comparable"] for t in per_task.values())
    averages_why = {kind: _average_differs(per_task, kind) for kind in (COMMONSENSE, ARITHMETIC)}
    return dict(
        protocol="generation",
        protocol_note="the PERFT paper's protocol (LLM-Adapters prompts, 4-beam search, 4 new tokens for commonsense "
        "and 256 for arithmetic, its answer extraction): "
        + (
            "comparable with the PERFT paper's numbers (not with LLM-Adapters' own commonsense table, which used 32 "
            "new tokens)"
            if comparable
            else "tasks with comparable=false are not comparable with the PERFT paper's numbers (see "
            "not_comparable_because)"
        ),
        settings=dict(
            prompt_template=PROMPT_TEMPLATE,
            prompt_template_sha256={k: _template_sha(k == COMMONSENSE) for k in (COMMONSENSE, ARITHMETIC)},
            num_beams=num_beams,
            batch_size=batch_size,  # None: batches of up to batch_tokens (generation.batches)
            batch_tokens=None if batch_size else batch_tokens,
            padding_side="left",
            max_new_tokens=max_tokens,
            answer_rules={task.name: task.rule for task, _, _ in loaded},
            **GENERATION,
        ),
        tasks=per_task,
        averages={kind: _mean(per_task, kind) for kind in (COMMONSENSE, ARITHMETIC)},
        # An average is comparable with the paper's only when it is the paper's: every task of its group, each
        # comparable (a one-task "average" is that task's accuracy, not the paper's average).
        averages_comparable={kind: not why for kind, why in averages_why.items()},
        averages_not_comparable_because=averages_why,
    )


def _backbone_differs(quantization: str, dtype: str) -> list[str]:
    """The paper evaluated its adapters on the bf16 backbone: anything else gives other numbers."""
    why = []
    if quantization != "none":
        why.append(f"{quantization} (4-bit) backbone (the paper evaluated on bf16)")
    if dtype != "bfloat16":
        why.append(f"{dtype} backbone (the paper evaluated on bfloat16)")
    return why


def _average_differs(per_task: dict[str, dict], kind: str) -> list[str]:
    """Why the average of ``kind`` cannot be set beside the paper's (empty: it can)."""
    group = COMMONSENSE_TASKS if kind == COMMONSENSE else ARITHMETIC_TASKS
    ran = [name for name, t in per_task.items() if t["kind"] == kind]
    if not ran:
        return [f"no {kind} task was evaluated"]
    if not any(name in group for name in ran):  # custom tasks only: not the paper's average at all
        return [f"none of the paper's {len(group)} {kind} tasks"]
    why = []
    missing = [name for name in group if name not in ran]
    if missing:
        why.append(
            f"{len(group) - len(missing)} of the paper's {len(group)} {kind} tasks (missing: {', '.join(missing)})"
        )
    if any(not per_task[name]["comparable"] for name in ran):
        why.append("a task in it is not comparable")
    return why


def _not_comparable(task: Task, complete: bool, path: Path, num_beams: int, max_new_tokens: int) -> list[str]:
    """Why one task's accuracy cannot be set beside published numbers (empty: it can)."""
    from perft_cli.evaluation import hub_converters

    why = []
    if task.custom:
        why.append("custom task")
    if not complete:
        why.append("not the paper's full test set")
    if num_beams != PROTOCOL_BEAMS:
        why.append(f"{num_beams} beams (protocol: {PROTOCOL_BEAMS})")
    if max_new_tokens != task.max_new_tokens:
        why.append(f"{max_new_tokens} new tokens (protocol: {task.max_new_tokens})")
    if (
        task.name in hub_converters.NOT_BYTE_VERIFIED
        and hub_converters.cache_root().resolve() in path.resolve().parents
    ):
        why.append("converted from the hub without a reference file to check the conversion against")
    return why


def _mean(per_task: dict[str, dict], kind: str) -> float | None:
    """Unweighted mean over the tasks of one kind that were evaluated (method.md), None if there are none."""
    accs = [t["accuracy"] for t in per_task.values() if t["kind"] == kind]
    return sum(accs) / len(accs) if accs else None


def _template_sha(commonsense: bool) -> str:
    return hashlib.sha256(eval_prompt("{instruction}", "", commonsense).encode()).hexdigest()


# --- plumbing --------------------------------------------------------------------------------------------------


def _recipe(ckpt, recipe_path, base: bool, overrides: list[str]):
    """The recipe to evaluate with (the checkpoint's, or --recipe with --base), ``--set`` overrides applied."""
    import yaml

    from perft_cli.checkpoint import check_ckpt_arg, load_checkpoint_recipe, resolve_checkpoint
    from perft_cli.config import apply_override, load_recipe, recipe_from_dict

    if ckpt is None:
        if recipe_path is None:
            raise PerftError("pass --ckpt DIR (a run or checkpoint directory), or --base --recipe R.yaml")
        if not base:
            raise PerftError("--recipe without --ckpt evaluates the frozen model only: add --base (or pass --ckpt)")
        return load_recipe(recipe_path, overrides), None
    if recipe_path is not None:
        raise PerftError("pass --ckpt or --recipe, not both (change the checkpoint's recipe with --set KEY=VALUE)")
    check_ckpt_arg(ckpt, "eval")  # a file, a merged LoRA model: say so (not "has the run saved yet?")
    path = resolve_checkpoint(ckpt)
    recipe = load_checkpoint_recipe(path)
    if overrides:
        raw = yaml.safe_load(recipe.to_yaml())
        for assignment in overrides:
            apply_override(raw, assignment)
        recipe = recipe_from_dict(raw, f"checkpoint recipe {path} with --set", base=Path.cwd())
    return recipe, path


def _default_tasks(recipe, mode: str) -> list[str]:
    train = (recipe.data.train or "").lower()
    if "commonsense" in train or mode == "lm-eval":
        return list(COMMONSENSE_TASKS)
    if "math" in train:
        return list(ARITHMETIC_TASKS)
    raise PerftError(f"no tasks to evaluate: pass --tasks a,b or set eval.tasks (known: {', '.join(TASKS)})")


def _default_json(ckpt_path: Path | None, recipe, base: bool, mode: str) -> Path:
    """RUN/eval/<checkpoint>-<adapted|base>-<time>.json for a run's checkpoint, else beside the checkpoint."""
    tag = ("base" if base else "adapted") + ("-lm-eval" if mode == "lm-eval" else "")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if ckpt_path is None:
        return Path(recipe.output_dir or "runs/base") / "eval" / f"{tag}-{stamp}.json"
    from perft_cli.checkpoint import run_dir_of

    run_dir = run_dir_of(ckpt_path)
    if run_dir is not None:
        return run_dir / "eval" / f"{ckpt_path.name}-{tag}-{stamp}.json"
    return ckpt_path / "eval" / f"{tag}-{stamp}.json"


def _place(model) -> None:
    """A model loaded without a device map sits on the CPU: move it to the GPU when there is one."""
    import torch

    if torch.cuda.is_available() and not getattr(model, "hf_device_map", None) and model.device.type == "cpu":
        model.to("cuda")


def _versions() -> dict[str, str | None]:
    return {d: dist_version(d) for d in ("perft-cli", "torch", "transformers", "peft")}


def _print_table(result: dict) -> None:
    from rich.table import Table

    from perft_cli.console import is_main_process, out, pct

    if not is_main_process():
        return
    if result["protocol"] == "lm-eval":
        return lm_eval_mode.print_table(result)
    who = "adapted " + str(result["checkpoint"]) if result["adapted"] else f"base {result['model']}"
    table = Table(title=f"perft eval: {who}\ngeneration protocol")
    for col in ("task", "kind", "examples", "accuracy %"):
        table.add_column(col, justify="left" if col in ("task", "kind") else "right")
    for name, t in result["tasks"].items():
        limited = "" if t.get("comparable", t["complete"]) else " *"
        table.add_row(name, t.get("kind", "-"), f"{t['examples']}{limited}", pct(t["accuracy"]))
    averages = {k: v for k, v in (result.get("averages") or {}).items() if v is not None}
    if averages:
        table.add_section()
    for kind, acc in averages.items():
        n = sum(t["kind"] == kind for t in result["tasks"].values())
        mark = "" if result.get("averages_comparable", {}).get(kind, True) else " *"
        table.add_row(f"[bold]average {kind}[/]", f"{n} task{'s' * (n > 1)}{mark}", "", f"[bold]{pct(acc)}[/]")
    reasons = sorted({r for t in result["tasks"].values() for r in t.get("not_comparable_because", [])})
    because = result.get("averages_not_comparable_because", {})
    reasons += [f"average {kind}: {'; '.join(because[kind])}" for kind in averages if because.get(kind)]
    if reasons:
        table.caption = f"* not comparable with published numbers: {'; '.join(reasons)}"
    out.print(table)
