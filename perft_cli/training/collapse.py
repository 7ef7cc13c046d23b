"""The routing-collapse watch of PERFT-R's routers: which layer sends most of its tokens to one expert, for how long.

Statistics only (the warning itself is printed by ``progress.warn_collapse``); its state is saved with checkpoints so
that a resumed run warns at the same step as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

COLLAPSE_STEPS = 20  # consecutive steps above train.collapse_share before a layer's router counts as collapsed


class CollapseWatch:
    """Watches the PERFT-R routers' load and reports a layer once, when one expert dominates it for long.

    A layer counts as collapsed at a step when one PERFT expert is chosen by more than ``share`` of the step's
    tokens. With top-K routing (K > 1) the fraction of *assignments* an expert can take is capped at 1/K, so the
    fraction of *tokens* choosing it is the measure that reaches 1 when the router stops routing. Layers with
    K = N (every expert always chosen) are not watched.
    """

    def __init__(self, num_experts: int, top_k: int, share: float, steps: int = COLLAPSE_STEPS):
        self.num_experts, self.top_k, self.share, self.steps = num_experts, top_k, share, steps
        self.enabled = 0 < top_k < num_experts
        self.counts: dict[int, torch.Tensor] = {}  # layer -> [N] tokens per expert this step
        self.loads: dict[int, dict[str, float]] = {}  # layer -> load_stats of the last closed step
        self.tokens = 0
        self.streak: dict[int, int] = {}
        self.reported: set[int] = set()

    def add(self, index: list[tuple[int, torch.Tensor]], mask: torch.Tensor) -> None:
        """One forward pass: index = recorder.index, (layer, [T, K]); mask [B, S] with 1 on real tokens."""
        if not self.enabled:
            return
        from perft_cli.perft import expert_counts

        flat = mask.reshape(-1)  # [T]
        for layer, idx in index:
            c = expert_counts(idx, self.num_experts, flat.to(idx.device)).cpu()  # [N]
            self.counts[layer] = self.counts.get(layer, torch.zeros_like(c)) + c
        self.tokens += int(flat.sum())

    def end_step(self, step: int) -> tuple[float | None, list[dict[str, Any]]]:
        """Close a step: (the largest expert's token share over layers, newly collapsed layers as events)."""
        if not self.enabled or not self.counts:
            return None, []
        from perft_cli.perft import load_stats

        events, top = [], 0.0
        self.loads = {layer: load_stats(c) for layer, c in sorted(self.counts.items())}
        for layer, c in sorted(self.counts.items()):
            share = c.double() / max(self.tokens, 1)  # [N] fraction of tokens choosing each expert
            s, e = float(share.max()), int(share.argmax())
            top = max(top, s)
            self.streak[layer] = self.streak.get(layer, 0) + 1 if s > self.share else 0
            if self.streak[layer] >= self.steps and layer not in self.reported:
                self.reported.add(layer)
                events.append({"step": step, "event": "routing_collapse", "layer": layer, "expert": e, "share": s})
        self.counts, self.tokens = {}, 0
        return top, events

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run warns at the same step as an uninterrupted one."""
        return {"streak": {str(k): v for k, v in self.streak.items()}, "reported": sorted(self.reported)}

    def load(self, state: dict[str, Any] | None) -> None:
        if state:
            self.streak = {int(k): int(v) for k, v in state.get("streak", {}).items()}
            self.reported = {int(x) for x in state.get("reported", [])}
