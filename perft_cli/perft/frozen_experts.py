"""The frozen base's routed experts as one autograd Function: forward, and an input-gradient-only backward.

Every transformers-5 experts class dispatches through ``@use_experts_implementation``:
``ALL_EXPERTS_FUNCTIONS[config._experts_implementation](self, hidden [T, D], top_k_index [T, k], top_k_weights)``.
The stock ``grouped_mm`` routine is written for experts that train: autograd records a gather, two grouped matmuls,
the gate, the routing-weight product, an inverse-permutation gather and a K-way sum, and its backward turns each
gather into a zero-filled scatter (``index_put_`` with accumulation on the CPU). Under PERFT the experts never need a
weight gradient, only the gradients of the block input and of the routing weights (the frozen router sits behind
trainable adapters of earlier layers). ``frozen_experts_forward`` computes the same numbers with less of that:

- one sort of the S = T*K (token, expert) pairs (``Dispatch``), kept for backward and offered to a PERFT-E adapter
  of the same block (``DISPATCH_SINK``), which then routes its own bank with it instead of sorting again;
- the pairs' outputs are added into their tokens' rows with ``index_add_`` on the CPU (deterministic there, one pass,
  no inverse-permutation gather); on CUDA, whose ``index_add_`` uses atomics, by the stock path's gather and
  fixed-order K-way sum, so runs stay bit-reproducible;
- backward is written out: one gather of the output gradient, two grouped matmuls against the transposed weights,
  the family's own gate differentiated on its saved input, and one ``index_add_`` (or gather + sum) back to tokens.

The weights are read through ``weight_of`` at forward and again at backward, never saved: for the NF4 experts
(quant/experts.py) that dequantizes one projection at a time, so autograd never holds a bf16 copy of the experts.
Everything saved goes through ``save_for_backward``, so activation checkpointing discards and recomputes it.
Experts that need more than this (trainable expert weights, e.g. peft's LoRA on the fused experts; expert
parallelism; a post-expert norm) fall back to the stock routine. Tests hold logits, input gradients and routing-
weight gradients equal to the stock routine's on every family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import (
    ExpertsInterface,
    _default_apply_gate,
    _grouped_mm,
    grouped_mm_experts_forward,
)

IMPLEMENTATION = "perft_frozen"  # the name registered in transformers' ExpertsInterface
DISPATCH_SINK = "_perft_dispatch_sink"  # experts-module attribute: a callable handed each call's Dispatch


@dataclass(frozen=True)
class Dispatch:
    """The (token, expert) pairs of one experts call sorted by expert: what grouped matmuls need."""

    index: torch.Tensor | None  # [T, K] the top-k expert index it was made from
    expert_ids: torch.Tensor | None  # [S] the expert of each sorted pair
    perm: torch.Tensor  # [S] pair (t*K + slot) at each sorted position
    token: torch.Tensor  # [S] perm // K, the token of each sorted pair
    offsets: torch.Tensor  # [E] int32 cumulative ends of each expert's rows


def make_dispatch(top_k_index: torch.Tensor, num_experts: int) -> Dispatch:
    """Sort the pairs by expert as transformers' grouped_mm path does (sort, histc, int32 cumsum), stably: rows of
    one expert keep token order, so a PERFT-E bank routed with it sums its weight gradients as after its own
    stable argsort (to the bit), and every row of the experts' own results is what the stock sort gives."""
    K = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1), stable=True)  # [S], [S]
    # histc, not bincount (CUDA graphs); histc takes no integers on the CPU.
    histc_input = expert_ids.float() if expert_ids.device.type in ("cpu", "mps") else expert_ids.int()
    counts = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)  # [E]
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E]
    return Dispatch(top_k_index, expert_ids, perm, perm // K, offsets)


def _project(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """x [S, in] through w ([E, out, in], or [E, in, out] when transposed) -> [S, out], in w's dtype."""
    return _grouped_mm(x.to(w.dtype), w if transposed else w.transpose(-2, -1), offs=offsets)


def _project_back(g: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The input gradient of ``_project``: g [S, out] -> [S, in]."""
    return _grouped_mm(g.to(w.dtype), w.transpose(-2, -1) if transposed else w, offs=offsets)


def _to_tokens(rows: torch.Tensor, d: Dispatch, T: int, like_sum: bool = False) -> torch.Tensor:
    """Sum each token's K sorted rows: [S, D] -> [T, D] (deterministic on every device).

    ``like_sum``: the forward's reduction, which the stock path does as a K-way ``sum`` (float32 accumulation,
    one rounding); in bf16 / fp16 a sequential ``index_add_`` would round after every add, so those take the
    same gather and sum. (The backward's reduction is the stock path's ``index_put_`` accumulation: index_add_.)
    """
    if rows.is_cuda or (like_sum and rows.dtype != torch.float32):
        inverse = torch.empty_like(d.perm).scatter_(0, d.perm, torch.arange(d.perm.numel(), device=rows.device))
        return rows.index_select(0, inverse).view(T, -1, rows.shape[-1]).sum(dim=1)  # [T, D]
    # The CPU's index_add_ adds in index order; one pass over [S, D], no inverse-permutation gather.
    return torch.zeros(T, rows.shape[-1], dtype=rows.dtype, device=rows.device).index_add_(0, d.token, rows)


def _is_swiglu(experts: nn.Module) -> bool:
    """The default gate (``act_fn(gate) * up`` on the concatenated halves) with SiLU: written out below."""
    return (
        experts.has_gate
        and type(experts)._apply_gate is _default_apply_gate
        and isinstance(getattr(experts, "act_fn", None), (nn.SiLU, SiLUActivation))
    )


class _FrozenExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_weights, experts, weight_of, d: Dispatch):
        up_name = "gate_up_proj" if experts.has_gate else "up_proj"
        T, swiglu = hidden.shape[0], _is_swiglu(experts)
        x = hidden.index_select(0, d.token)  # [S, D] (index_select: a plain gather, ~6x faster than x[idx] here)
        up = _project(x, weight_of(experts, up_name), d.offsets, experts.is_transposed)  # [S, 2I] or [S, I]
        del x
        if experts.has_bias:
            up = up + getattr(experts, f"{up_name}_bias")[d.expert_ids]  # [S, 2I]
        if swiglu:
            inter = up.shape[-1] // 2
            # saved for backward, as the stock graph saves it
            silu_gate = torch.nn.functional.silu(up[:, :inter])  # [S, I]
            act = silu_gate * up[:, inter:]  # [S, I]
        else:
            silu_gate = up.new_empty(0)
            act = experts._apply_gate(up) if experts.has_gate else experts.act_fn(up)  # [S, I]
        out = _project(act, weight_of(experts, "down_proj"), d.offsets, experts.is_transposed)  # [S, D]
        del act
        if experts.has_bias:
            out = out + experts.down_proj_bias[d.expert_ids]  # [S, D]
        w = top_k_weights.reshape(-1).index_select(0, d.perm)  # [S]
        y = _to_tokens(out * w.unsqueeze(-1), d, T, like_sum=True)  # [T, D] in the promoted dtype, as stock sums
        ctx.save_for_backward(up, silu_gate, out, w, d.perm, d.token, d.offsets)
        ctx.experts, ctx.weight_of, ctx.up_name, ctx.T, ctx.swiglu = experts, weight_of, up_name, T, swiglu
        ctx.hidden_dtype, ctx.weights_shape, ctx.weights_dtype = hidden.dtype, top_k_weights.shape, top_k_weights.dtype
        return y.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        up, silu_gate, out, w, perm, token, offsets = ctx.saved_tensors
        experts = ctx.experts
        d = Dispatch(None, None, perm, token, offsets)
        # In the dtype the forward's routing-weight product ran in (bf16 experts x float32 router weights: float32),
        # rounded where the stock graph rounds, so the gradients are that graph's to the bit.
        acc = torch.promote_types(out.dtype, w.dtype)
        g = grad_y.to(acc).index_select(0, token)  # [S, D] each pair's share of its token's gradient
        grad_weights = None
        if ctx.needs_input_grad[1]:
            g_w = (g * out.to(acc)).sum(-1)  # [S]
            flat = torch.empty(perm.numel(), dtype=g_w.dtype, device=g_w.device).index_copy_(0, perm, g_w)  # [T*K]
            grad_weights = flat.view(ctx.weights_shape).to(ctx.weights_dtype)  # [T, K]
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            g_out = (g * w.unsqueeze(-1).to(acc)).to(out.dtype)  # [S, D]
            del g
            g_act = _project_back(g_out, ctx.weight_of(experts, "down_proj"), offsets, experts.is_transposed)  # [S, I]
            del g_out
            g_up = _gate_backward(experts, up, silu_gate, g_act, ctx.swiglu)  # [S, 2I] or [S, I]
            del g_act
            g_x = _project_back(g_up, ctx.weight_of(experts, ctx.up_name), offsets, experts.is_transposed)  # [S, D]
            grad_hidden = _to_tokens(g_x, d, ctx.T).to(ctx.hidden_dtype)  # [T, D]
        return grad_hidden, grad_weights, None, None, None


def _gate_backward(experts, up, silu_gate, g_act, swiglu: bool) -> torch.Tensor:
    """d act / d up for act = gate(up): SwiGLU written straight into one [S, 2I] buffer (no zero fill, no cat);
    any other gate (gpt-oss's clamped SwiGLU, GELU, ...) differentiated through its own code on the saved input."""
    if swiglu:
        inter = silu_gate.shape[-1]
        g_act = g_act.to(up.dtype)
        g_up = torch.empty_like(up)  # [S, 2I]
        torch.ops.aten.silu_backward.grad_input(g_act * up[:, inter:], up[:, :inter], grad_input=g_up[:, :inter])
        torch.mul(g_act, silu_gate, out=g_up[:, inter:])
        return g_up
    with torch.enable_grad():
        up_ = up.detach().requires_grad_()
        act = experts._apply_gate(up_) if experts.has_gate else experts.act_fn(up_)  # [S, I]
        (g_up,) = torch.autograd.grad(act, up_, g_act.to(act.dtype))  # [S, 2I] or [S, I]
    return g_up


def plain_weight(experts: nn.Module, name: str) -> torch.Tensor:
    return getattr(experts, name)


def frozen_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weight_of: Callable[[nn.Module, str], torch.Tensor] = plain_weight,
) -> torch.Tensor:
    """transformers' experts call for frozen experts; the stock grouped_mm routine where that does not hold."""
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    frozen = not (getattr(self, up_name).requires_grad or self.down_proj.requires_grad)
    if not frozen or self._is_expert_parallel or self.has_post_expert_norm:
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    d = make_dispatch(top_k_index, self.num_experts)
    sink = getattr(self, DISPATCH_SINK, None)
    if sink is not None:
        sink(d)
    return _FrozenExperts.apply(hidden_states, top_k_weights, self, weight_of, d)


ExpertsInterface.register(IMPLEMENTATION, frozen_experts_forward)


def select_frozen_experts(model: nn.Module, name: str = IMPLEMENTATION) -> None:
    """Point the model's experts dispatch at ``name`` (and every config that an experts module reads); a model
    without fused experts modules is left as it is."""
    if not any(is_experts_module(m) for m in model.modules()):
        return
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(name)
    # Experts modules read their own config; a wrapped or partial model may not route through the call above.
    for module in model.modules():
        config = getattr(module, "config", None)
        if is_experts_module(module) and config is not None and config._experts_implementation != name:
            config._experts_implementation_internal = name


def is_experts_module(module: nn.Module) -> bool:
    """A transformers-5 fused experts module (decorated with ``@use_experts_implementation``)."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "num_experts")
