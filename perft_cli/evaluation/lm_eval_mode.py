"""``perft eval --mode lm-eval``: lm-evaluation-harness tasks scored on the loaded model, adapters attached.

A different protocol from the paper's (each task's own prompt and log-likelihood scoring), labelled as such in the
results, the table and the per-example file. lm-eval's HFLM wraps the model object perft loaded, so the PERFT
adapters (forward hooks on its MoE blocks) score every request; nothing is reloaded. Local task YAMLs come from
``--lm-eval-include DIR`` (``demo/lm_eval/`` has the demo's). The package is an optional extra (``lm-eval``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perft_cli import dist_version
from perft_cli.console import pct
from perft_cli.errors import PerftError
from perft_cli.evaluation.tasks import known_task

LM_EVAL_NAMES = {  # our task names -> lm-evaluation-harness task names
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "social_iqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "ARC-Easy": "arc_easy",
    "ARC-Challenge": "arc_challenge",
    "openbookqa": "openbookqa",
    "gsm8k": "gsm8k",
}
LM_EVAL_TYPES = {  # lm-eval output types, as the table shows them
    "multiple_choice": "choice",
    "loglikelihood": "loglik",
    "loglikelihood_rolling": "rolling",
    "generate_until": "generate",
}
# Requests per forward without eval.batch_size: its old default. The generation protocol's token budget does not
# carry over, as HFLM batches log-likelihood requests itself and takes a fixed size.
BATCH_SIZE = 8
LM_EVAL_INSTALL = "--mode lm-eval needs lm-evaluation-harness: pip install 'perft-cli[lm-eval]'"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError:
        raise PerftError(LM_EVAL_INSTALL) from None


def _lm_eval_dir(include: str | Path) -> str:
    if not Path(include).is_dir():
        raise PerftError(f"--lm-eval-include {include}: not a directory (expected a folder of lm-eval task YAMLs)")
    return str(include)


def local_tasks(include: str | Path) -> list[str]:
    """The tasks (not groups or tags) defined by the task YAML files under ``include``."""
    from lm_eval.tasks import TaskManager

    names = TaskManager(include_path=_lm_eval_dir(include), include_defaults=False).all_subtasks
    if not names:
        raise PerftError(f"--lm-eval-include {include}: no lm-eval task YAML (a file with a 'task:' key) in it")
    return names


def task_manager(names: list[str], include: str | Path | None):
    """``(TaskManager, lm-eval task names)``: every task found before the model is loaded.

    Our task names map to lm-eval's (``LM_EVAL_NAMES``: arc-e -> arc_easy) unless the include folder defines the
    name itself; a path to a task YAML file is a task too. Only the include folder is indexed when it holds every
    task asked for (lm-eval's ~15,000 built-in tasks take seconds to index); otherwise both are, the folder's tasks
    taking precedence.
    """
    from lm_eval.tasks import TaskManager

    include = _lm_eval_dir(include) if include is not None else None
    local = TaskManager(include_path=include, include_defaults=False)
    is_yaml = lambda n: n.endswith((".yaml", ".yml")) and Path(n).is_file()  # noqa: E731
    lm_names = [
        n if n in local.all_tasks or is_yaml(n) else LM_EVAL_NAMES.get(t.name, n) if (t := known_task(n)) else n
        for n in names
    ]
    if all(n in local.all_subtasks or is_yaml(n) for n in lm_names):
        return local, lm_names
    manager = TaskManager(include_path=include)
    unknown = [n for n in lm_names if n not in manager.all_tasks and not is_yaml(n)]
    if unknown:
        where = f" nor in --lm-eval-include {include}" if include else ""
        raise PerftError(
            f"unknown lm-eval task {', '.join(map(repr, unknown))}: not one of lm-eval's {len(manager.all_tasks)} "
            f"tasks, groups and tags{where} (list them: lm-eval ls tasks; local task YAMLs: --lm-eval-include DIR)"
        )
    return manager, lm_names


def run_lm_eval(
    model, tokenizer, manager, lm_names: list[str], examples_file: Path, *, batch_size: int, limit: int | None
) -> dict:
    """Log-likelihood scoring of lm-eval tasks on the loaded model (adapters attached): a different protocol.

    lm-eval's HFLM wraps this model object as it is (nothing is reloaded from disk), so the PERFT adapters, which run
    from forward hooks on its MoE blocks, score every request. Per-task numbers go to the results, every sample
    (prompt, continuations, their log-likelihoods, the metrics) to ``examples_file``.
    """
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    hflm_log = logging.getLogger(HFLM.__module__)
    level = hflm_log.level
    hflm_log.setLevel(logging.ERROR)  # its warnings about being handed a model object are what we mean to do
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hflm_log.setLevel(level)
    if lm.model is not model:  # the adapters live on this object: scoring any other would silently drop them
        raise PerftError(f"lm-eval {dist_version('lm_eval')} does not score the model it is given: not supported")
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=lm_names, limit=limit, task_manager=manager, log_samples=True)
    except (FileNotFoundError, ConnectionError) as e:  # a task's data files, or a hub dataset while offline
        raise PerftError(f"lm-eval could not load the data of {', '.join(lm_names)}: {e}") from e
    out = out or {}
    n_samples, configs, n_shot = out.get("n-samples", {}), out.get("configs", {}), out.get("n-shot", {})
    per_task = {}
    for name, metrics in out.get("results", {}).items():
        # "acc,none" -> "acc" (the unfiltered score); other filters keep their name ("exact_match,strict-match").
        scores = {
            k.removesuffix(",none"): v
            for k, v in metrics.items()
            if "," in k and isinstance(v, int | float) and not isinstance(v, bool)
        }
        n = n_samples.get(name, {})
        per_task[name] = dict(
            output_type=configs.get(name, {}).get("output_type"),
            examples=n.get("effective"),
            total_examples=n.get("original"),
            complete=n.get("effective") == n.get("original") if n else None,  # None: a group
            num_fewshot=n_shot.get(name),
            accuracy=scores.get("acc"),
            acc_stderr=scores.get("acc_stderr"),
            acc_norm=scores.get("acc_norm"),
            acc_norm_stderr=scores.get("acc_norm_stderr"),
            metrics=scores,
        )
    with examples_file.open("w") as fh:
        for name, samples in (out.get("samples") or {}).items():
            for sample in sorted(samples, key=lambda s: s.get("doc_id", 0)):
                fh.write(json.dumps(_lm_eval_row(name, sample), default=_plain) + "\n")
    from perft_cli.perft.inject import is_adapter_param

    adapter_params = sum(p.numel() for n, p in model.named_parameters() if is_adapter_param(n))
    return dict(
        protocol="lm-eval",
        protocol_note=LM_EVAL_NOTE,
        settings=dict(
            lm_eval_version=dist_version("lm_eval"),
            lm_eval_tasks=lm_names,
            lm_eval_include=str(Path(manager.include_path).resolve()) if manager.include_path else None,
            batch_size=batch_size,
            device=str(lm.device),
            adapter_parameters=adapter_params,
        ),
        tasks=per_task,
    )


LM_EVAL_NOTE = (
    "lm-evaluation-harness: each task's own prompt and scoring (log-likelihood of the answer choices for "
    "multiple-choice tasks). NOT comparable with the paper's generation protocol (LLM-Adapters prompts, 4-beam "
    "search, answer extraction) or with published PERFT numbers"
)


def _lm_eval_row(task: str, sample: dict) -> dict:
    """One lm-eval sample as a JSON Lines row: prompt, continuations, their log-likelihoods and the metrics."""
    args = [a for a in sample.get("arguments") or [] if isinstance(a, list | tuple) and a]
    row: dict[str, Any] = dict(task=task, index=sample.get("doc_id"), target=sample.get("target"))
    if args and isinstance(args[0][0], str):
        row["prompt"] = args[0][0]
    if args and all(len(a) == 2 and isinstance(a[1], str) for a in args):
        row["continuations"] = [a[1] for a in args]  # multiple_choice: one per choice, in the task's order
    resps = sample.get("filtered_resps") or []
    if resps and all(isinstance(r, list | tuple) and len(r) == 2 for r in resps):
        row["loglikelihoods"] = [float(r[0]) for r in resps]  # summed over each continuation's tokens
        row["is_greedy"] = [bool(r[1]) for r in resps]
    else:
        row["responses"] = resps
    row.update({m: sample.get(m) for m in sample.get("metrics", [])})
    return row


def _plain(value: Any) -> Any:
    """JSON for numpy scalars and whatever else lm-eval puts in a sample."""
    return value.item() if hasattr(value, "item") else str(value)


def print_table(result: dict) -> None:
    """acc and acc_norm (± lm-eval's standard error) per task, other metrics as they are; labelled as such."""
    from rich.table import Table

    from perft_cli.console import out

    who = "adapted " + str(result["checkpoint"]) if result["adapted"] else f"base {result['model']}"
    version = result["settings"].get("lm_eval_version") or ""
    title = f"perft eval: {who}\nlm-evaluation-harness {version} (NOT comparable with the paper's protocol)"
    caption = result["protocol_note"]
    if any(t["complete"] is False for t in result["tasks"].values()):
        caption += ". * the first --limit examples only"
    table = Table(title=title, caption=caption)
    table.add_column("task", min_width=max(map(len, result["tasks"]), default=4))  # names stay whole
    for col in ("type", "examples", "acc %", "acc_norm %", "other metrics"):
        table.add_column(col, justify="left" if col in ("type", "other metrics") else "right", overflow="fold")
    main = {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    for name, t in result["tasks"].items():
        other = ", ".join(f"{k} {v:.4g}" for k, v in t["metrics"].items() if k not in main and "_stderr" not in k)
        examples = "-" if t["examples"] is None else f"{t['examples']}{' *' * (t['complete'] is False)}"
        acc, acc_norm = (
            pct(t[k]) + (f" ±{pct(t[e])}" if t[k] is not None and t[e] is not None else "")
            for k, e in (("accuracy", "acc_stderr"), ("acc_norm", "acc_norm_stderr"))
        )
        kind = LM_EVAL_TYPES.get(t["output_type"], t["output_type"] or "group")
        table.add_row(name, kind, examples, acc, acc_norm, other or "-")
    out.print(table)
