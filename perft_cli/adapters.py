"""One entry point for every adapter the recipe can ask for: the PERFT variants (perft/) and the LoRA baseline (peft).

The PERFT core knows nothing of recipes or model families; this module finds the MoE blocks (arch.py), turns the
recipe's ``adapter`` section into the core's PerftConfig, and attaches. The MoE-agnostic baseline is standard LoRA on
the attention projections through peft's ``inject_adapter_in_model`` (no PeftModel wrapper, so the base keeps its
parameter names and the LoRA weights keep peft's ``lora_`` names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perft_cli.arch import MoEFamily, find_moe_blocks
from perft_cli.config import AdapterConfig
from perft_cli.errors import ModelError, RecipeError
from perft_cli.perft import (
    PerftConfig,
    RoutingRecorder,
    adapter_state_dict,
    attach,
    count_params,
    detach,
    load_adapter_state_dict,
)

LORA_PREFIX = "lora_"


@dataclass
class Attached:
    """What was attached: the recorder for PERFT-R routing and the adapter parameter counts."""

    variant: str
    recorder: RoutingRecorder = field(default_factory=RoutingRecorder)
    moe_layers: int = 0
    num_experts: int = 0  # PEFT experts per layer (perft-r's N for its aux loss)
    top_k: int = 0


def perft_config(cfg: AdapterConfig) -> PerftConfig:
    return PerftConfig(
        variant=cfg.variant,
        expert_form=cfg.expert,
        num_experts=1 if cfg.variant == "perft-s" else cfg.num_experts,
        top_k=cfg.top_k,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        init=cfg.init,
        renormalize=cfg.renormalize,
        scale_by_base_router=cfg.scale_by_base_router,
        impl=cfg.impl,
    )


def _lora_targets(model: nn.Module, cfg: AdapterConfig, family: MoEFamily) -> list[str]:
    wanted = cfg.target_modules or list(family.lora_targets)
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    present |= {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m).__name__ == "Linear4bit"}
    targets = [t for t in wanted if t in present]
    if not targets:
        raise RecipeError(
            f"adapter.target_modules {wanted} match no Linear layer of this model; "
            f"some that exist: {sorted(present)[:8]}"
        )
    return targets


def attach_adapter(model: nn.Module, cfg: AdapterConfig, family: MoEFamily) -> Attached:
    """Attach what ``cfg.variant`` names and freeze everything else."""
    blocks = find_moe_blocks(model, family)
    info = Attached(cfg.variant, moe_layers=len(blocks))
    if cfg.variant == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank,
            lora_dropout=cfg.dropout,
            target_modules=_lora_targets(model, cfg, family),
            bias="none",
        )
        inject_adapter_in_model(lora, model)
        for name, p in model.named_parameters():
            p.requires_grad_(LORA_PREFIX in name)
            if LORA_PREFIX in name:
                p.data = p.data.float()  # adapter weights in float32 on a bf16 base (method.md)
        return info
    base_e = blocks[0].num_experts
    if cfg.variant == "perft-r" and cfg.top_k > cfg.num_experts:
        raise RecipeError(f"adapter.top_k={cfg.top_k} is larger than adapter.num_experts={cfg.num_experts}")
    try:
        adapters = attach(model, blocks, perft_config(cfg), info.recorder)
    except ValueError as e:
        raise RecipeError(f"adapter: {e}") from None
    info.num_experts, info.top_k = adapters[0].num_experts, adapters[0].top_k
    assert cfg.variant != "perft-e" or info.num_experts == base_e
    return info


def detach_adapter(model: nn.Module, variant: str) -> None:
    """Remove the adapters (the LoRA baseline is unloaded back to the plain Linear layers)."""
    if variant == "lora":
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name, module in list(model.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, module.get_base_layer())
        return
    detach(model)


def is_adapter_param(name: str) -> bool:
    return "perft_" in name or LORA_PREFIX in name


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adapter_state(model: nn.Module, variant: str) -> dict[str, torch.Tensor]:
    """Only what was trained, by full parameter name, on the CPU."""
    if variant != "lora":
        return adapter_state_dict(model)
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if LORA_PREFIX in n}


def load_adapter_state(model: nn.Module, variant: str, state: dict[str, torch.Tensor]) -> None:
    try:
        if variant != "lora":
            load_adapter_state_dict(model, state)
            return
        params = {n: p for n, p in model.named_parameters() if LORA_PREFIX in n}
        if set(params) != set(state):
            raise KeyError(f"LoRA weights do not match the model ({len(state)} saved, {len(params)} expected)")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p.device, p.dtype))
    except KeyError as e:
        raise ModelError(f"{e.args[0]}; was the checkpoint trained with another adapter or model?") from None


def _numel(p: torch.Tensor) -> int:
    """Logical parameter count: a 4-bit tensor stores two weights per byte; its quant_state keeps the real shape."""
    state = getattr(p, "quant_state", None)
    return int(math.prod(state.shape)) if state is not None else p.numel()


def accounting(model: nn.Module, cfg: AdapterConfig, family: MoEFamily) -> dict[str, Any]:
    """Parameter accounting by method.md: adapter trainable / activated per token, base total / activated."""
    blocks = find_moe_blocks(model, family)
    base_total = sum(_numel(p) for n, p in model.named_parameters() if not is_adapter_param(n))
    base_active = base_total
    for b in blocks:
        # Fused routed experts: a token touches k of E experts (platform.md: count numel * k / E).
        n = sum(_numel(p) for p in b.experts.parameters())
        base_active -= n - n * b.top_k // b.num_experts
    if cfg.variant == "lora":
        trainable = sum(p.numel() for n, p in model.named_parameters() if LORA_PREFIX in n)
        adapter = {"trainable": trainable, "activated": trainable, "per_layer": []}
    else:
        adapter = count_params(model)
    return {
        "variant": cfg.variant,
        "moe_layers": len(blocks),
        "base_num_experts": blocks[0].num_experts,
        "base_top_k": blocks[0].top_k,
        "hidden_size": blocks[0].hidden_size,
        "trainable_params": adapter["trainable"],
        "activated_params": adapter["activated"],
        "base_total_params": base_total,
        "base_activated_params": base_active,
        "total_params": base_total + adapter["trainable"],
        "trainable_percent": 100.0 * adapter["trainable"] / max(base_total, 1),
        "per_layer": adapter["per_layer"],
    }
