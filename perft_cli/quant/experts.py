"""Fused routed experts stored in NF4, computed through transformers' expert dispatch.

Every transformers-5 experts class goes through ``@use_experts_implementation``: its forward is
``ALL_EXPERTS_FUNCTIONS[config._experts_implementation](self, hidden [T, D], top_k_index [T, k], top_k_weights)``.
We register ``"perft_nf4"``: perft's frozen experts Function (perft_cli/perft/frozen_experts.py: the stock
grouped_mm numbers, one sort, an input-gradient-only backward) reading each packed 3D weight through
``dequantize``. The Function asks for a weight at forward and again at backward and never saves it, so autograd
never holds a bf16 copy of the experts (frozen weights need no gradient and grad_x needs only W). Calling the stock
routine on dequantized weights instead would hand them to torch's grouped_mm autograd, which saves them: +1x the
bf16 experts in training memory (shared/docs/platform.md). At most one projection of one layer is dequantized at any
time, and activation checkpointing composes (its recompute simply dequantizes once more). Tests check, for every
family, that logits and input gradients equal those of the stock routine on the dequantized weights.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch
from torch import nn
from transformers.integrations.moe import ExpertsInterface

from perft_cli.perft.frozen_experts import frozen_experts_forward, is_experts_module, select_frozen_experts
from perft_cli.quant.nf4 import disable_cpu_repack_, is_nf4, quantize_nf4

IMPLEMENTATION = "perft_nf4"  # the name registered in transformers' ExpertsInterface
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")  # the fused 3D weights an experts class may hold


def dequantize(experts: nn.Module, name: str) -> torch.Tensor:
    """One packed weight of ``experts`` in its compute dtype (``[E, out, in]``, ``[E, in, out]`` if transposed)."""
    w = getattr(experts, name)
    return bnbf.dequantize_4bit(w.data, w.quant_state) if is_nf4(w) else w


def nf4_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """perft's frozen experts path with NF4 weights (plain weights pass through ``dequantize`` unchanged)."""
    if self._is_expert_parallel:
        raise NotImplementedError("NF4 experts do not support expert parallelism")
    return frozen_experts_forward(self, hidden_states, top_k_index, top_k_weights, weight_of=dequantize)


ExpertsInterface.register(IMPLEMENTATION, nf4_experts_forward)


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
    select_frozen_experts(model, IMPLEMENTATION)
