"""``perft validate``: check a recipe, its model's config, its tokenizer, every training record and the eval test
files in seconds, without loading any weights, and say what was checked.

Each check is what ``perft train`` / ``perft eval`` would find first, with the same one-line errors: the typed
recipe, ``config.json`` (local, or the hub cache) and the MoE blocks the adapter attaches to (built on the meta
device, as ``perft plan`` does), the tokenizer files, each record of ``data.train``, the batch size against the data,
and ``eval.tasks``' test files.
"""

from __future__ import annotations

from typing import Any

from perft_cli.config import Recipe, ignored_keys


def run_validate(recipe: Recipe) -> list[tuple[str, str]]:
    """(what, result) for every check, in order; the first failing check raises its one-line PerftError."""
    from perft_cli.adapters import accounting, attach_adapter
    from perft_cli.data import check_split, read_records
    from perft_cli.modeling import DTYPES, load_config, load_tokenizer, meta_model
    from perft_cli.training.setup import schedule_length

    done: list[tuple[str, str]] = []
    unused = ignored_keys(recipe)
    done.append(
        ("recipe", "typed and complete" + (f"; not read by this variant: {', '.join(unused)}" if unused else ""))
    )

    config, family = load_config(recipe.model)
    model = meta_model(config, DTYPES[recipe.model.dtype])  # no weights: shapes and names only
    acc = accounting(model, attach_adapter(model, recipe.adapter, family))
    done.append(
        (
            "model",
            f"{recipe.model.name_or_path}: {family.display}, {acc['moe_layers']} MoE layers of "
            f"{acc['base_num_experts']} experts (top-{acc['base_top_k']}), config.json only",
        )
    )
    done.append(
        ("adapter", f"{recipe.adapter.variant}: {acc['trainable_params']:,} trainable, {acc['activated_params']:,} "
                    "activated per token")
    )  # fmt: skip
    tokenizer = load_tokenizer(recipe.model)
    done.append(("tokenizer", f"{type(tokenizer).__name__}, {len(tokenizer):,} tokens"))

    records, source = read_records(recipe.data)
    check_split(len(records), recipe.data, source)
    n_train = len(records) - recipe.data.val_size
    steps_per_epoch, total = schedule_length(recipe, n_train)
    done.append(
        (
            "data",
            f"{len(records):,} records checked ({source}): {n_train:,} train / {recipe.data.val_size:,} held out, "
            f"{steps_per_epoch:,} steps per epoch, {total:,} steps",
        )
    )
    done += _eval_checks(recipe)
    return done


def _eval_checks(recipe: Recipe) -> list[tuple[str, str]]:
    from perft_cli.evaluation.testsets import load_records, resolve_tasks

    if not recipe.eval.tasks:
        return [("eval", "no eval.tasks (perft eval --tasks names them)")]
    found = []
    for task, folder in resolve_tasks(recipe.eval.tasks, recipe.eval.data_dir, "eval.data_dir"):
        if folder is None:  # a registry task without a local file: perft eval would convert its hub dataset
            found.append(f"{task.name} (no local test file: perft eval converts its hub dataset)")
            continue
        task, rows, path = load_records(task, folder, recipe.eval.data_dir)
        found.append(f"{task.name} ({len(rows):,} records, {path})")
    return [("eval", "; ".join(found))]


def print_checks(checks: list[tuple[str, Any]]) -> None:
    """One plain line per check (never wrapped, so paths stay whole in a terminal and in a log file)."""
    from perft_cli.console import out

    width = max(len(what) for what, _ in checks)
    for what, result in checks:
        out.print(f"{what:<{width}}  {result}", markup=False, highlight=False, soft_wrap=True)
    out.print("ok: every check passed (no weights were loaded)", markup=False, highlight=False)
