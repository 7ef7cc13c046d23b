"""What an inspect-routing report is made of: the no-grad routing passes over a dataset and the per-layer numbers.

Forward hooks on the frozen routers count each real token's top-k experts (padding excluded); for PERFT-R the
adapters' RoutingRecorder gives their own router's top-K on the same tokens, hence the co-occurrence of adapter and
base experts. ``perft_cli/inspect_routing.py`` runs the two passes (adapters attached, then detached) and this
package's renderings show the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from perft_cli.perft.inject import router_topk

BASE_COLLAPSE_FACTOR = 3.0  # flag a base expert whose share exceeds 3x the uniform share 1/E


# ------------------------------------------------------------------------------------------------------------- batches
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
            # The top-k the experts receive, whatever the router's output form (perft.inject.router_topk).
            self.index[layer] = router_topk(module, output)[1].detach()  # [T, k]

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
def layer_load(counts: torch.Tensor) -> dict[str, Any]:
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
        "before": layer_load(b),
        "after": layer_load(a),
        # Total variation distance between the before / after load distributions (0 = same, 1 = disjoint).
        "shift": float(0.5 * (pa - pb).abs().sum()),
        # Share of real tokens whose set of top-k base experts differs after fine-tuning.
        "changed_tokens": changed,
        "perft": None,
        "cooccurrence": None,
    }
    if layer in after["perft"]:
        report["perft"] = {**layer_load(after["perft"][layer]), "top_k": perft_k}
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
