"""Fused routed experts stored in NF4, computed through transformers' expert dispatch.

Every transformers-5 experts class goes through ``@use_experts_implementation``: its forward is
``ALL_EXPERTS_FUNCTIONS[config._experts_implementation](self, hidden [T, D], top_k_index [T, k], top_k_weights)``.
We register ``"perft_nf4"``: the stock ``grouped_mm_experts_forward`` bookkeeping (sort by expert, offsets, biases,
gate, routing weights, unsort), mirrored line for line, with its two weight matmuls replaced by ``_NF4GroupedLinear``.
That custom autograd Function dequantizes one packed 3D weight, runs transformers' own ``_grouped_mm`` kernel
dispatch, and keeps only the int32 offsets for backward, where it dequantizes again. Calling the stock routine on
dequantized weights instead would hand them to torch's grouped_mm autograd, which saves them: +1x the bf16 experts
in training memory (shared/docs/platform.md). So autograd never holds a bf16 copy of the experts (frozen weights
need no gradient and grad_x needs only W), at most one projection of one layer is dequantized at any time, and
activation checkpointing composes (its recompute simply dequantizes once more). Tests check, for every family,
that logits and input gradients equal those of the stock routine on the dequantized weights.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface, _grouped_mm, grouped_mm_experts_forward

from perft_cli.quant.nf4 import disable_cpu_repack_, is_nf4, quantize_nf4

IMPLEMENTATION = "perft_nf4"  # the name registered in transformers' ExpertsInterface
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")  # the fused 3D weights an experts class may hold


class _NF4GroupedLinear(torch.autograd.Function):
    """``x [S, in] -> [S, out]`` through a packed weight ``[E, out, in]`` (``[E, in, out]`` when transposed)."""

    @staticmethod
    def forward(ctx, x, offsets, packed, quant_state, transposed):
        w = bnbf.dequantize_4bit(packed, quant_state)  # [E, out, in] or [E, in, out], compute dtype
        y = _grouped_mm(x, w if transposed else w.transpose(-2, -1), offs=offsets)  # [S, out]
        ctx.save_for_backward(offsets)
        ctx.packed, ctx.quant_state, ctx.transposed, ctx.x_dtype = packed, quant_state, transposed, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (offsets,) = ctx.saved_tensors
        w = bnbf.dequantize_4bit(ctx.packed, ctx.quant_state)  # recomputed, never saved
        # grouped_mm's kernel rejects expanded (zero-stride) gradients such as the one .sum() produces.
        grad_y = grad_y.contiguous().to(w.dtype)  # [S, out]
        grad_x = _grouped_mm(grad_y, w.transpose(-2, -1) if ctx.transposed else w, offs=offsets)  # [S, in]
        return grad_x.to(ctx.x_dtype), None, None, None, None


def _nf4_linear(x: torch.Tensor, weight, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    return _NF4GroupedLinear.apply(x, offsets, weight.data, weight.quant_state, transposed)


def nf4_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' ``grouped_mm_experts_forward`` with NF4 weights (falls back to it for unquantized experts)."""
    up_name = "gate_up_proj" if self.has_gate else "up_proj"
    up_w, down_w = getattr(self, up_name), self.down_proj
    if not (is_nf4(up_w) and is_nf4(down_w)):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if self._is_expert_parallel:
        raise NotImplementedError("NF4 experts do not support expert parallelism")
    device = hidden_states.device
    T, D = hidden_states.shape
    K = top_k_index.size(-1)

    # Same routing bookkeeping as the stock grouped_mm path: sort the S = T*K (token, expert) pairs by expert.
    sample_weights = top_k_weights.reshape(-1)  # [S]
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))  # [S]
    x_g = hidden_states[perm // K]  # [S, D]
    weights_g = sample_weights[perm]  # [S]
    # histc, not bincount (CUDA graphs); histc takes no integers on CPU.
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)  # [E]
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)  # [E]

    h = _nf4_linear(x_g, up_w, offsets, self.is_transposed)  # [S, 2I] (or [S, I] without gate)
    if self.has_bias:
        h = h + getattr(self, f"{up_name}_bias")[expert_ids_g]  # [S, 2I]
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # [S, I]
    out = _nf4_linear(h, down_w, offsets, self.is_transposed)  # [S, D]
    if self.has_bias:
        out = out + self.down_proj_bias[expert_ids_g]  # [S, D]
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    out = out * weights_g.unsqueeze(-1)  # [S, D]

    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    # Summing the K slots of each token (not index_add_) accumulates deterministically, as the stock path does.
    out = out[inv_perm].view(T, K, D).sum(dim=1)  # [T, D]
    return out.to(hidden_states.dtype)


ExpertsInterface.register(IMPLEMENTATION, nf4_experts_forward)


def is_experts_module(module: nn.Module) -> bool:
    """A transformers-5 fused experts module (decorated with ``@use_experts_implementation``)."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "num_experts")


def quantize_experts_(
    model: nn.Module, *, double_quant: bool = False, compute_dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """Quantize every fused routed-experts weight of ``model`` to NF4 in place and select the NF4 dispatch.

    Experts biases (gpt-oss) stay in their dtype. Other layers are untouched (``load_model_nf4`` also quantizes the
    Linear layers), except that any Linear4bit already there gets its CPU repack switched off. Returns ``model``.
    """
    found = 0
    for module in model.modules():
        if not is_experts_module(module):
            continue
        for name in EXPERT_WEIGHTS:
            w = getattr(module, name, None)
            if isinstance(w, torch.Tensor) and not is_nf4(w):
                setattr(module, name, quantize_nf4(w.data, double_quant=double_quant, compute_dtype=compute_dtype))
                del w
                found += 1
    if found:
        select_nf4_experts(model)
    disable_cpu_repack_(model)
    return model


def select_nf4_experts(model: nn.Module) -> None:
    """Point the model's experts dispatch at the NF4 routine (and every config that an experts module reads)."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(IMPLEMENTATION)
    # Experts modules read their own config; a wrapped or partial model may not route through the call above.
    for module in model.modules():
        config = getattr(module, "config", None)
        if is_experts_module(module) and config is not None and config._experts_implementation != IMPLEMENTATION:
            config._experts_implementation_internal = IMPLEMENTATION
