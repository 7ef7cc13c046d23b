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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from perft_cli.errors import DataError, PerftError

BASE_COLLAPSE_FACTOR = 3.0  # flag a base expert whose share exceeds 3x the uniform share 1/E
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


def batches(encoded: list[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids [B, S], attention_mask [B, S]) batches in order."""
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, S]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, S]
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        yield ids, mask


# ----------------------------------------------------------------------------------------------------- routing passes
class RouterTap:
    """Forward hooks on the frozen routers that keep the current batch's top-k index per layer (nothing else)."""

    def __init__(self, blocks: list[Any]):
        self.index: dict[int, torch.Tensor] = {}
        self.handles = [ref.router.register_forward_hook(self._hook(ref.layer)) for ref in blocks]

    def _hook(self, layer: int):
        def hook(module, args, output):
            # Routers return (logits [T, E], topk_weights [T, k], topk_index [T, k]) (arch.py).
            self.index[layer] = output[2].detach()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def pair_counts(perft_index: torch.Tensor, base_index: torch.Tensor, n: int, e: int) -> torch.Tensor:
    """How often each PEFT expert is chosen together with each base expert on the same token.

    perft_index: [T, K], base_index: [T, k] (real tokens only). Returns [N, E] int64 summing to T * K * k.
    """
    pairs = perft_index[:, :, None] * e + base_index[:, None, :]  # [T, K, k] flat (PEFT, base) pair ids
    return torch.bincount(pairs.reshape(-1), minlength=n * e).view(n, e)


@torch.no_grad()
def routing_pass(
    model: Any,
    blocks: list[Any],
    batch_list: list[tuple[torch.Tensor, torch.Tensor]],
    recorder: Any = None,
    perft_n: dict[int, int] | None = None,
    progress: Any = None,
) -> dict[str, dict]:
    """One no-grad forward of the decoder per batch; per-layer base counts, PERFT-R counts, co-occurrence, top-k sets.

    ``recorder`` (PERFT-R's RoutingRecorder) and ``perft_n`` (layer -> its N) turn on the adapter router's counts.
    """
    from perft_cli.perft import expert_counts

    decoder = model.base_model  # the decoder stack without the LM head
    device = model.get_input_embeddings().weight.device
    tap = RouterTap(blocks)
    counts = {b.layer: torch.zeros(b.num_experts, dtype=torch.int64) for b in blocks}
    perft: dict[int, torch.Tensor] = {}
    cooc: dict[int, torch.Tensor] = {}
    # Each real token's sorted top-k per layer, to count tokens whose experts changed: 2 bytes x k per token and
    # layer (120 examples x 256 tokens x top-8 x 16 layers = 7.9 MB).
    sets: dict[int, list[torch.Tensor]] = {b.layer: [] for b in blocks}
    num_e = {b.layer: b.num_experts for b in blocks}
    try:
        for ids, mask in batch_list:
            tap.index.clear()
            if recorder is not None:
                recorder.start()
            decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            if recorder is not None:
                recorder.stop()
            real = mask.reshape(-1).bool()  # [T] T = B*S, the routers' row order
            for layer, index in tap.index.items():
                index = index.cpu()  # [T, k]
                if index.shape[0] != real.numel():
                    raise RuntimeError(f"layer {layer}: router saw {index.shape[0]} tokens, expected {real.numel()}")
                counts[layer] += expert_counts(index, num_e[layer], real)
                sets[layer].append(index[real].sort(dim=-1).values.to(torch.int16))  # [T_real, k]
            for layer, pindex in recorder.index if recorder is not None else ():
                pindex = pindex.cpu()  # [T, K]
                n = perft_n[layer]
                perft[layer] = perft.get(layer, torch.zeros(n, dtype=torch.int64)) + expert_counts(pindex, n, real)
                pair = pair_counts(pindex[real], tap.index[layer].cpu()[real], n, num_e[layer])  # [N, E]
                cooc[layer] = cooc.get(layer, 0) + pair
            if recorder is not None:
                recorder.index.clear()
                recorder.logits.clear()
            if progress is not None:
                progress()
    finally:
        tap.remove()
    return {"counts": counts, "perft": perft, "cooc": cooc, "sets": {k: torch.cat(v) for k, v in sets.items() if v}}


# -------------------------------------------------------------------------------------------------------- statistics
def _load(counts: torch.Tensor) -> dict[str, Any]:
    from perft_cli.perft import load_stats

    total = int(counts.sum())
    shares = [c / total if total else 0.0 for c in counts.tolist()]
    return {"counts": counts.tolist(), "shares": shares, "stats": load_stats(counts)}


def layer_report(layer: int, name: str, top_k: int, after: dict, before: dict, perft_k: int | None) -> dict[str, Any]:
    """Everything about one MoE layer as plain numbers."""
    a, b = after["counts"][layer], before["counts"][layer]
    tokens = int(a.sum()) // top_k
    pa, pb = a.double() / max(int(a.sum()), 1), b.double() / max(int(b.sum()), 1)
    sa, sb = after["sets"].get(layer), before["sets"].get(layer)
    changed = float((sa != sb).any(-1).double().mean()) if sa is not None and sa.numel() else 0.0
    report = {
        "layer": layer,
        "name": name,
        "num_experts": a.numel(),
        "top_k": top_k,
        "tokens": tokens,
        "before": _load(b),
        "after": _load(a),
        # Total variation distance between the before / after load distributions (0 = same, 1 = disjoint).
        "shift": float(0.5 * (pa - pb).abs().sum()),
        # Share of real tokens whose set of top-k base experts differs after fine-tuning.
        "changed_tokens": changed,
        "perft": None,
        "cooccurrence": None,
    }
    if layer in after["perft"]:
        report["perft"] = {**_load(after["perft"][layer]), "top_k": perft_k}
        report["cooccurrence"] = after["cooc"][layer].tolist()
    return report


def find_alarms(layers: list[dict], collapse_share: float, base_factor: float = BASE_COLLAPSE_FACTOR) -> list[dict]:
    """Collapse (one expert over its threshold share) and dead experts (no tokens) after fine-tuning, per layer.

    The base router is judged on its "after" load (what fine-tuning did to it), with its "before" figure in the
    message: an uneven load the frozen model already had on this data is its own specialisation, not an alarm.
    """
    alarms = []
    for rep in layers:
        routers = [("base", rep["after"], base_factor / rep["num_experts"], rep["before"])]
        if rep["perft"] is not None:
            routers.append(("perft", rep["perft"], collapse_share, None))
        for router, load, threshold, before in routers:
            where = {"layer": rep["layer"], "router": router}
            shares, counts = load["shares"], load["counts"]
            top = max(range(len(shares)), key=shares.__getitem__)
            if len(shares) > 1 and shares[top] > threshold:
                was = f"; {before['shares'][top]:.1%} before fine-tuning" if before else ""
                msg = f"layer {rep['layer']} {router} router: expert {top} takes {shares[top]:.1%} of the load "
                msg += f"(threshold {threshold:.1%}{was})"
                alarms.append(
                    {**where, "kind": "collapse", "expert": top, "share": shares[top], "threshold": threshold}
                    | {"message": msg}
                )
            dead = [i for i, c in enumerate(counts) if c == 0]
            if dead:
                names = ", ".join(map(str, dead[:8])) + (", ..." if len(dead) > 8 else "")
                was = f"; {sum(c == 0 for c in before['counts'])} before fine-tuning" if before else ""
                msg = f"layer {rep['layer']} {router} router: {len(dead)} of {len(shares)} experts got no tokens "
                msg += f"({names}{was})"
                alarms.append({**where, "kind": "dead", "experts": dead, "message": msg})
    return alarms


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
    from perft_cli.adapters import detach_adapter
    from perft_cli.arch import find_moe_blocks
    from perft_cli.checkpoint import check_ckpt_arg, load_checkpoint_recipe, resolve_checkpoint
    from perft_cli.data import tokenize
    from perft_cli.modeling import load_trained
    from perft_cli.perft import attached_adapters

    check_ckpt_arg(ckpt, "inspect-routing")  # a file, a merged LoRA model: say so (not "has the run saved yet?")
    path = resolve_checkpoint(ckpt)
    recipe = load_checkpoint_recipe(path)
    records, data_cfg, source = select_records(recipe, data, limit, path)  # before the model loads
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
    return report
