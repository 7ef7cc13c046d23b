"""The PERFT core: torch and transformers types only (no YAML, CLI, printing or Accelerate)."""

from perft_cli.perft.block import VARIANTS, PerftAdapter, PerftConfig, RoutingRecorder
from perft_cli.perft.experts import ExpertBank
from perft_cli.perft.inject import (
    adapter_state_dict,
    attach,
    attached_adapters,
    count_params,
    detach,
    freeze_base,
    is_adapter_param,
    load_adapter_state_dict,
    remember_requires_grad,
    restore_requires_grad,
)
from perft_cli.perft.routing import expert_counts, load_balancing_loss, load_stats, topk_indices, topk_route

__all__ = [
    "VARIANTS",
    "ExpertBank",
    "PerftAdapter",
    "PerftConfig",
    "RoutingRecorder",
    "adapter_state_dict",
    "attach",
    "attached_adapters",
    "count_params",
    "detach",
    "expert_counts",
    "freeze_base",
    "is_adapter_param",
    "load_adapter_state_dict",
    "load_balancing_loss",
    "load_stats",
    "remember_requires_grad",
    "restore_requires_grad",
    "topk_indices",
    "topk_route",
]
