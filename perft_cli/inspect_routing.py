"""``perft inspect-routing``: how tokens are routed among the experts, before and after fine-tuning, per MoE layer.

Two no-grad passes over the same batches: one with the trained adapters attached ("after"), then one with them
detached ("before", the frozen model). Forward hooks on the frozen routers count each real token's top-k experts
(padding excluded); for PERFT-R the adapters' RoutingRecorder gives their own router's top-K on the same tokens, hence
the co-occurrence of adapter and base experts. Each pass runs the decoder only: routing never needs the LM head,
which dominates a forward pass with a large vocabulary (platform.md, CPU speed reference).

Note that with adapters attached, the hidden states entering later layers change, so a later layer's "after" base
routing differs from "before" even though its router is frozen.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from perft_cli.errors import DataError, PerftError

DEFAULT_LIMIT = 120  # examples taken from the training records when the recipe holds no validation split


# ---------------------------------------------------------------------------------------------------------------- data
def select_examples(recipe: Any, tokenizer: Any, data: Path | None, limit: int | None) -> tuple[list[list[int]], str]:
    """Token ids of the examples to route (training prompts as training tokenises them), and where they came from."""
    from perft_cli.data import tokenize

    records, cfg, source = select_records(recipe, data, limit)
    return tokenize(records, tokenizer, cfg).input_ids, source


def select_records(
    recipe: Any, data: Path | None, limit: int | None, ckpt: Path | None = None
) -> tuple[list[dict[str, str]], Any, str]:
    """The records to route, the data settings to tokenise them with, and where they came from (for the report).

    ``--data FILE``: that file's records. Otherwise the run's held-out split of ``data.train`` (the examples the eval
    loss used, never trained on), or its first records when the recipe holds none out. Read before the model loads,
    so that a missing file fails at once; ``ckpt`` names the checkpoint whose recipe holds ``data.train``.
    """
    from perft_cli.data import read_records, split_indices

    cfg = recipe.data
    if data is not None:
        cfg = cfg.model_copy(update={"train": str(data), "format": "auto"})
    _check_source(cfg, data, ckpt)
    if data is not None:
        records, source = read_records(cfg)
        records, what = records[:limit], f"{len(records[:limit])} of {len(records)} records"
    else:
        records, source = read_records(cfg)
        _, val = split_indices(len(records), min(cfg.val_size, len(records) - 1), cfg.val_seed)
        if len(val):
            records, what = [records[i] for i in val[:limit]], f"validation split, {len(val[:limit])} records"
        else:
            records, what = records[: limit or DEFAULT_LIMIT], "first training records (no validation split)"
    if not records:
        raise DataError(f"{source}: no records to route")
    return records, cfg, f"{source} ({what})"


def _check_source(cfg: Any, data: Path | None, ckpt: Path | None) -> None:
    """A missing data file named in the words of this command: ``--data``, or the run's ``data.train``.

    inspect-routing has no ``--set``: the only way to change the data is ``--data FILE``, so that is the advice
    (data.read_records would say "check data.train").
    """
    from perft_cli.checkpoint import RECIPE_FILE
    from perft_cli.data import source_format

    fix = "pass the examples to route with --data FILE (JSON or JSONL instruction/output records)"
    recipe_file = f" in {Path(ckpt) / RECIPE_FILE}" if ckpt is not None else ""
    if data is None and not cfg.train:
        raise DataError(f"the checkpoint's recipe{recipe_file} has no data.train; {fix}")
    if source_format(cfg) == "hub":
        return  # read_records names the dataset and what went wrong
    path = Path(cfg.train).expanduser()
    if path.is_file():
        return
    what = "is a directory, not a file" if path.is_dir() else "not found"
    if data is not None:
        raise DataError(f"--data {str(data)!r} {what}; pass a JSON or JSONL file of instruction/output records")
    raise DataError(f"the run's training data {cfg.train!r} (data.train{recipe_file}) {what}; {fix}")


# ---------------------------------------------------------------------------------------------------------- command
def inspect(
    ckpt: Path,
    data: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    collapse_share: float = 0.5,
    progress: bool = True,
) -> dict[str, Any]:
    """Route the dataset through the trained model (adapters attached) and the frozen one; return the report."""
    from perft_cli.checkpoint import check_ckpt_arg, load_checkpoint_recipe, resolve_checkpoint

    check_ckpt_arg(ckpt, "inspect-routing")  # a file, a merged LoRA model: say so (not "has the run saved yet?")
    path = resolve_checkpoint(ckpt)
    recipe = load_checkpoint_recipe(path)
    records, data_cfg, source = select_records(recipe, data, limit, path)  # before the model loads
    # torch and transformers from here on: every argument has been checked.
    from perft_cli.adapters import detach_adapter
    from perft_cli.arch import find_moe_blocks
    from perft_cli.data import tokenize
    from perft_cli.modeling import load_trained
    from perft_cli.perft import attached_adapters
    from perft_cli.routing_report.counting import (
        BASE_COLLAPSE_FACTOR,
        batches,
        find_alarms,
        layer_report,
        routing_pass,
    )

    model, tokenizer, recipe, family, attached = load_trained(path, recipe=recipe)
    encoded = tokenize(records, tokenizer, data_cfg).input_ids
    batch_list = list(batches(encoded, batch_size, tokenizer.pad_token_id))
    blocks = find_moe_blocks(model, family)
    recorder = attached.recorder if attached.variant == "perft-r" else None
    perft_n = {a.layer: a.num_experts for a in attached_adapters(model)}

    with _progress(2 * len(batch_list), progress) as step:
        after = routing_pass(model, blocks, batch_list, recorder, perft_n, step)
        detach_adapter(model, attached.variant)  # the frozen model again: the "before" routing on the same tokens
        before = routing_pass(model, blocks, batch_list, progress=step)

    layers = [
        layer_report(b.layer, b.name, b.top_k, after, before, attached.top_k if recorder else None) for b in blocks
    ]
    return {
        "checkpoint": str(path),
        "model": recipe.model.name_or_path,
        "family": family.model_type,
        "variant": attached.variant,
        "data": source,
        "examples": len(encoded),
        "tokens": sum(len(ids) for ids in encoded),
        "cutoff_len": recipe.data.cutoff_len,
        "moe_layers": len(blocks),
        "base_num_experts": blocks[0].num_experts,
        "top_k": blocks[0].top_k,
        "perft_num_experts": attached.num_experts if recorder else None,
        "perft_top_k": attached.top_k if recorder else None,
        "collapse_share": collapse_share,
        "base_collapse_factor": BASE_COLLAPSE_FACTOR,
        "layers": layers,
        "alarms": find_alarms(layers, collapse_share),
    }


class _progress:
    """A transient rich progress bar on stderr (a no-op callable when off)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        from perft_cli.console import err

        self.bar = Progress(console=err, transient=True)
        self.bar.start()
        task = self.bar.add_task("routing (adapters attached, then detached)", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def run_inspect(
    ckpt: Path,
    data: Path | None = None,
    limit: int | None = None,
    json_path: Path | None = None,
    html_path: Path | None = None,
    png_path: Path | None = None,
    batch_size: int = 8,
    collapse_share: float = 0.5,
) -> dict[str, Any]:
    """The command: inspect, print the terminal report, write the files asked for."""

    from perft_cli import routing_report
    from perft_cli.console import info
    from perft_cli.outputs import atomic_file, check_output_file

    # Every output path is checked before the (long) routing pass, not after it.
    given = (("--json", json_path), ("--html", html_path), ("--png", png_path))
    outputs = {option: Path(p).expanduser() for option, p in given if p is not None}
    for option, path in outputs.items():
        check_output_file(path, option, f"choose another path for {option}")
    if len({p.resolve() for p in outputs.values()}) < len(outputs):
        raise PerftError(f"{' and '.join(outputs)} name the same file; give each its own path")
    png_format = routing_report.png_format(outputs["--png"]) if "--png" in outputs else None
    report = inspect(ckpt, data, limit, batch_size, collapse_share)
    routing_report.print_report(report)
    # All files or none: each is rendered to a temporary file, and they are renamed into place together at the end.
    with contextlib.ExitStack() as stack:
        tmp = {option: stack.enter_context(atomic_file(path)) for option, path in outputs.items()}
        if "--json" in tmp:
            tmp["--json"].write_text(json.dumps(report, indent=2))
        if "--html" in tmp:
            tmp["--html"].write_text(routing_report.render_html(report), encoding="utf-8")
        if "--png" in tmp:
            routing_report.render_png(report, tmp["--png"], png_format)
    for path in outputs.values():
        info(f"wrote {path}")
    logged = log_to_run(report)
    if logged is not None:
        info(f"per-layer routing statistics appended to {logged}")
    return report


def log_to_run(report: dict[str, Any]) -> Path | None:
    """Append the per-layer routing numbers to the run's metrics.jsonl, as one ``routing`` event at the checkpoint's
    step (the share of tokens whose base top-k changed, and NeMo's load-balance metrics before and after), so a run's
    log holds them beside its losses. Returns the file, or None for a checkpoint outside a run directory."""
    from perft_cli.checkpoint import run_dir_of
    from perft_cli.training.progress import METRICS_FILE

    ckpt = Path(report["checkpoint"])
    run = run_dir_of(ckpt)
    metrics = run / METRICS_FILE if run is not None else None
    if metrics is None or not metrics.is_file():
        return None
    keys = ("util_p25", "util_median", "util_p75", "dead_fraction")
    layers = [
        {
            "layer": r["layer"],
            "changed_tokens": round(r["changed_tokens"], 4),
            **{f"base_{k}": round(r["after"]["stats"][k], 4) for k in keys},
            **{f"base_{k}_before": round(r["before"]["stats"][k], 4) for k in keys},
        }
        for r in report["layers"]
    ]
    step = int(ckpt.name.removeprefix("step-")) if ckpt.name.startswith("step-") else None
    event = {"step": step, "event": "routing", "checkpoint": ckpt.name, "tokens": report["tokens"], "layers": layers}
    with open(metrics, "a") as fh:
        fh.write(json.dumps(event) + "\n")
    return metrics
