"""The LoRA fold: each peft LoraLayer merged into its frozen base weight, checked against the exact float32 sum."""

from __future__ import annotations

from typing import Any

import torch

from perft_cli.errors import PerftError


@torch.no_grad()  # the deltas are built from trainable LoRA weights: no graph for a fold
def fold_lora(model: Any) -> tuple[list[str], float]:
    """Merge every peft LoraLayer into its base weight and put the plain base layer back.

    Returns the folded module names and the largest weight error against the exact float32 ``W + s * B @ A``, in
    units of the storage dtype's rounding bound (peft rounds the delta, then the sum: <= u * (|delta| + |W'|) with u
    the unit roundoff). A value <= 1 proves the fold itself exact up to storage rounding, whatever the dtype.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    folded, worst = [], 0.0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)  # [out, in]
        exact = weight.detach().float() + delta  # [out, in]
        module.merge(safe_merge=True)  # safe_merge: checks the merged weight for NaN/inf before writing it
        u = torch.finfo(weight.dtype).eps / 2
        bound = u * (delta.abs() + exact.abs()) + torch.finfo(weight.dtype).tiny
        merged = module.get_base_layer().weight.detach().float()
        worst = max(worst, float(((merged - exact).abs() / bound).max()))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())
        folded.append(name)
    left = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if left:
        raise PerftError(f"cannot fold adapter layers of another kind: {left[:3]}")
    if hasattr(model, "peft_config"):  # set by peft's inject_adapter_in_model; nothing is left to describe
        del model.peft_config
    return folded, worst
