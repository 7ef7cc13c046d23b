"""One entry point for every adapter the recipe can ask for: the PERFT variants (perft/) and the LoRA baseline (peft).

The PERFT core knows nothing of recipes or model families; this module finds the MoE blocks (arch.py), turns the
recipe's ``adapter`` section into the core's PerftConfig, and attaches. The MoE-agnostic baseline is standard LoRA on
the attention projections through peft's ``inject_adapter_in_model`` (no PeftModel wrapper, so the base keeps its
parameter names and the LoRA weights keep peft's ``lora_`` names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from perft_cli.arch import MoEBlockRef, MoEFamily, find_moe_blocks
from perft_cli.config import AdapterConfig
from perft_cli.errors import ModelError, RecipeError
from perft_cli.perft import (
    PerftConfig,
    RoutingRecorder,
    adapter_state_dict,
    attach,
    count_params,
    detach,
    is_adapter_param,
    load_adapter_state_dict,
    remember_requires_grad,
    restore_requires_grad,
)

LORA_PREFIX = "lora_"  # peft's name for the baseline's weights (PERFT's own carry perft.PREFIX)


@dataclass
class Attached:
    """What was attached: the MoE blocks found, the recorder for PERFT-R routing, the PEFT expert counts."""

    variant: str
    family: MoEFamily
    blocks: list[MoEBlockRef] = field(default_factory=list)
    recorder: RoutingRecorder = field(default_factory=RoutingRecorder)
    num_experts: int = 0  # PEFT experts per layer (perft-r's N for its aux loss)
    top_k: int = 0

    @property
    def moe_layers(self) -> int:
        return len(self.blocks)


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


# --- the two kinds of adapter: the PERFT core's (perft/) and peft's LoRA baseline --------------------------------
# Each kind is five small functions, picked once by ``_kind(variant)``: attach (and freeze the rest), detach,
# state dict, load a state dict, and the trainable / activated counts.


def _unsorted_topk(ref: MoEBlockRef) -> bool:
    """Does this family pick its top-k with ``torch.topk(..., sorted=False)`` (DeepSeek-V2/V3 and their kin)?

    Read from the source of transformers' own router and block classes (read, never run); no source: assume
    sorted, as transformers' other routers are.
    """
    import inspect

    for cls in (type(ref.router), type(ref.block)):
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        if "sorted=False" in source.replace(" ", ""):
            return True
    return False


def _attach_perft(model: nn.Module, cfg: AdapterConfig, family: MoEFamily, info: Attached) -> None:
    if cfg.scale_by_base_router and cfg.variant == "perft-r" and info.blocks and _unsorted_topk(info.blocks[0]):
        raise RecipeError(
            f"adapter.scale_by_base_router weighs PERFT-R's j-th expert by the base router's j-th top-k slot, but "
            f"{family.display} returns its top-k unsorted (torch.topk sorted=False), so slot j means nothing; set "
            "adapter.scale_by_base_router: false (the paper's equation)"
        )
    try:  # adapter.top_k against adapter.num_experts is checked with the recipe (config.py), the rest by the core
        adapters = attach(model, info.blocks, perft_config(cfg), info.recorder)
    except ValueError as e:
        raise RecipeError(f"adapter: {e}") from None
    info.num_experts, info.top_k = adapters[0].num_experts, adapters[0].top_k


def _lora_targets(model: nn.Module, cfg: AdapterConfig, family: MoEFamily) -> list[str]:
    wanted = cfg.target_modules or list(family.lora_targets)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Linear4bit"]
    targets = matching_targets(wanted, linears)
    present = {n.rsplit(".", 1)[-1] for n in linears}
    if not targets:
        raise RecipeError(
            f"adapter.target_modules {wanted} match no Linear layer of this model; "
            f"some that exist: {sorted(present)[:8]}"
        )
    return targets


def matching_targets(wanted: list[str], module_names) -> list[str]:
    """The targets of ``wanted`` that name some module, matched as peft does, by the name's end: "v_proj", or
    "v_proj.linear" for a wrapped projection."""
    return [t for t in wanted if any(n == t or n.endswith("." + t) for n in module_names)]


def lora_config(cfg: AdapterConfig, targets: list[str], **extra: Any):
    """peft's LoraConfig of the baseline: rank, scale (``cfg.lora_alpha``), dropout, no bias, on ``targets``."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none", **extra
    )


def _attach_lora(model: nn.Module, cfg: AdapterConfig, family: MoEFamily, info: Attached) -> None:
    from peft import inject_adapter_in_model

    lora = lora_config(cfg, _lora_targets(model, cfg, family))
    remember_requires_grad(model)  # detach gives them back (the same record the core keeps for PERFT)
    inject_adapter_in_model(lora, model)
    for name, p in model.named_parameters():
        p.requires_grad_(LORA_PREFIX in name)
        if LORA_PREFIX in name:
            p.data = p.data.float()  # adapter weights in float32 on a bf16 base (method.md)


def _detach_lora(model: nn.Module) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    restore_requires_grad(model)


def _lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if LORA_PREFIX in n}


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in _lora_params(model).items()}


def _load_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = _lora_params(model)
    if set(params) != set(state):
        raise KeyError(f"LoRA weights do not match the model ({len(state)} saved, {len(params)} expected)")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


def _count_lora(model: nn.Module) -> dict[str, Any]:
    trainable = sum(p.numel() for p in _lora_params(model).values())
    return {"trainable": trainable, "activated": trainable, "per_layer": []}  # always on: activated = trainable


@dataclass(frozen=True)
class _Kind:
    attach: Callable[[nn.Module, AdapterConfig, MoEFamily, Attached], None]
    detach: Callable[[nn.Module], Any]
    state: Callable[[nn.Module], dict[str, torch.Tensor]]
    load: Callable[[nn.Module, dict[str, torch.Tensor]], None]
    count: Callable[[nn.Module], dict[str, Any]]


_KINDS = {
    "perft": _Kind(_attach_perft, detach, adapter_state_dict, load_adapter_state_dict, count_params),
    "lora": _Kind(_attach_lora, _detach_lora, _lora_state, _load_lora, _count_lora),
}


def _kind(variant: str) -> _Kind:
    return _KINDS["lora" if variant == "lora" else "perft"]


# --- what the commands call ------------------------------------------------------------------------------------


def attach_adapter(model: nn.Module, cfg: AdapterConfig, family: MoEFamily) -> Attached:
    """Attach what ``cfg.variant`` names and freeze everything else."""
    info = Attached(cfg.variant, family, blocks=find_moe_blocks(model, family))
    _kind(cfg.variant).attach(model, cfg, family, info)
    return info


def detach_adapter(model: nn.Module, variant: str) -> None:
    """Remove the adapters (the LoRA baseline is unloaded back to the plain Linear layers)."""
    _kind(variant).detach(model)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def adapter_state(model: nn.Module, variant: str) -> dict[str, torch.Tensor]:
    """Only what was trained, by full parameter name, on the CPU."""
    return _kind(variant).state(model)


def load_adapter_state(model: nn.Module, variant: str, state: dict[str, torch.Tensor]) -> None:
    try:
        _kind(variant).load(model, state)
    except KeyError as e:
        raise ModelError(f"{e.args[0]}; was the checkpoint trained with another adapter or model?") from None


def accounting(model: nn.Module, attached: Attached) -> dict[str, Any]:
    """Parameter accounting by method.md: adapter trainable / activated per token, base total / activated."""
    from perft_cli.quant.nf4 import logical_numel  # a 4-bit tensor counts the weights it stands for

    blocks = attached.blocks
    base_total = sum(logical_numel(p) for n, p in model.named_parameters() if not is_adapter_param(n))
    base_active = base_total
    for b in blocks:
        # Fused routed experts: a token touches k of E experts (platform.md: count numel * k / E).
        n = sum(logical_numel(p) for p in b.experts.parameters())
        base_active -= n - n * b.top_k // b.num_experts
    adapter = _kind(attached.variant).count(model)
    return {
        "variant": attached.variant,
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
