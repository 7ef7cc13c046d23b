"""Routing math as pure functions: top-k routing, the Switch load-balancing loss, routing statistics.

Dimensions: T tokens, N experts, K experts per token. Routing runs in float32: softmax over bf16 logits loses the
small differences between experts that decide the top-k, and the load-balancing loss sums many tiny products.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [T, k] of the k largest scores of each row of ``scores`` [T, N], largest first (no gradient).

    On the CPU, for k <= 4, k rounds of argmax-and-mask: ``torch.topk`` over a [T, N] CPU tensor costs about
    0.4 us per row at N = 64 whatever k is, 2.2x (512 rows) to 2.9x (2048 rows) slower than two argmax rounds
    (measured with one thread; this sits on every PERFT-R layer's forward). Elsewhere ``torch.topk``.
    """
    scores = scores.detach()
    if scores.is_cuda or k > 4 or k >= scores.shape[-1]:
        return torch.topk(scores, k, dim=-1).indices
    work = scores.clone()
    picks = []
    for _ in range(k):  # k rounds, not a loop over experts
        best = work.argmax(dim=-1, keepdim=True)  # [T, 1]
        picks.append(best)
        work.scatter_(1, best, float("-inf"))
    return torch.cat(picks, dim=1)


def topk_route(logits: torch.Tensor, k: int, renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """PERFT-R routing (method.md): p = softmax(logits) over all N in float32, top-K, optionally renormalised.

    logits: [T, N]. Returns (weights [T, K] float32, index [T, K] int64).
    The top-K of p are the top-K of the logits (softmax is monotonic), and the renormalised weights
    p_i / sum_{j in TopK} p_j equal a softmax over the K chosen logits, so with ``renormalize`` only [T, K] values
    enter the graph (no [T, N] softmax forward and backward per layer; the aux loss takes its own softmax).
    """
    logits = logits.float()
    index = topk_indices(logits, k)  # [T, K]
    if renormalize:
        return F.softmax(logits.gather(1, index), dim=-1), index
    return F.softmax(logits, dim=-1).gather(1, index), index


def load_balancing_loss(
    logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    index: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Switch-style load-balancing loss ``N * sum_i f_i P_i`` over all layers' router logits, padding masked.

    Same definition as transformers' ``load_balancing_loss_func`` (which the base model uses for its own router),
    so the PERFT router's aux loss is on the same scale as the model's: f_i counts top-K assignments per token
    (summing to K) and P_i is the mean router probability, both averaged over the non-padding tokens of all layers.
    logits: one [T, N] tensor per layer; attention_mask: [B, S] with B*S = T, 1 for real tokens; index: each
    layer's top-K [T, K] when the caller already has it (the routing recorder does), else taken from the logits.
    """
    device = logits[0].device
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)  # [N]
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)  # [N]
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for i, layer_logits in enumerate(logits):
        probs = F.softmax(layer_logits.float(), dim=-1)  # [T, N]
        chosen = topk_indices(probs, top_k) if index is None else index[i]  # [T, K]
        weight = torch.ones(chosen.shape[0], device=device) if mask is None else mask  # [T]
        counts = counts.scatter_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * weight[:, None]).sum(0)
        rows = rows + weight.sum()
    rows = rows.clamp_min(1.0)
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))


def expert_counts(index: torch.Tensor, num_experts: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert. index: [T, K]; mask: [T] (1 = count this token). Returns [N] int64."""
    flat = index.reshape(-1)  # [T*K]
    if mask is None:
        return torch.bincount(flat, minlength=num_experts)
    weights = mask.reshape(-1, 1).expand_as(index).reshape(-1).to(torch.int64)  # [T*K]
    return torch.zeros(num_experts, dtype=torch.int64, device=index.device).scatter_add(0, flat, weights)


def load_stats(counts: torch.Tensor) -> dict[str, float]:
    """Summary of one layer's expert load: normalised entropy, coefficient of variation, max share, dead experts,
    and NeMo's load-balance metrics (utilisation quartiles, dead-expert fraction)."""
    c = counts.double()
    total = c.sum().clamp_min(1.0)
    share = c / total  # [N]
    n = c.numel()
    nz = share[share > 0]
    entropy = float(-(nz * nz.log()).sum() / torch.log(torch.tensor(float(n)))) if n > 1 else 1.0
    mean = c.mean()
    cv = float(c.std(unbiased=False) / mean) if mean > 0 else 0.0
    # NeMo's load-balance names: each expert's utilisation is its load relative to a uniform one (share * N, 1 =
    # uniform), summarised by its quartiles; the dead fraction is the share of experts that got no token.
    util = (share * n).sort().values  # [N]
    p25, median, p75 = (float(torch.quantile(util, q)) for q in (0.25, 0.5, 0.75))
    return {
        "entropy": entropy,
        "cv": cv,
        "max_share": float(share.max()),
        "dead": int((c == 0).sum()),
        "dead_fraction": float((c == 0).sum()) / n,
        "util_p25": p25,
        "util_median": median,
        "util_p75": p75,
    }
