"""Attach / detach PERFT adapters, freeze the base by prefix, the adapter-only state dict, parameter accounting.

Every trainable parameter's name contains ``perft_`` (``...mlp.perft_adapter.experts.perft_A``), so "freeze the
rest", "save the adapters" and "count trainable" are name filters, as in peft.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import nn

from perft_cli.perft.block import PerftAdapter, PerftConfig, RoutingRecorder
from perft_cli.perft.frozen_experts import DISPATCH_SINK, Dispatch

PREFIX = "perft_"
ATTR = "perft_adapter"
# model -> {parameter name: requires_grad} as attach found them, for detach to give back (not stored on the model).
_FOUND_REQUIRES_GRAD: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()
# Every adapter weight perft trains carries one of these in its name: PERFT's own prefix, or peft's for the LoRA
# baseline. "Is this an adapter parameter?" is this one name test everywhere (accounting, audit, lm-eval summary).
ADAPTER_MARKERS = (PREFIX, "lora_")


def is_adapter_param(name: str) -> bool:
    return any(m in name for m in ADAPTER_MARKERS)


class BlockRef(Protocol):
    """What attach needs to know about one MoE block (perft_cli.arch.MoEBlockRef satisfies it)."""

    layer: int
    block: nn.Module
    router: nn.Module
    num_experts: int
    top_k: int
    hidden_size: int


def _block_hook(block: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    adapter: PerftAdapter = block.perft_adapter
    h = args[0] if args else kwargs["hidden_states"]  # [B, S, D] or [T, D]: the FFN sub-layer input
    captured, dispatch = adapter._captured, adapter._dispatch
    adapter._captured = adapter._dispatch = None
    if adapter.needs_base_routing and captured is None:
        raise RuntimeError(f"layer {adapter.layer}: the frozen router did not run inside its block")
    base_weights, base_index = captured if captured is not None else (None, None)
    hidden = output[0] if isinstance(output, tuple) else output
    if dispatch is not None and dispatch.index is not base_index:
        dispatch = None  # the experts were handed another index than the router's: the bank sorts its own
    delta = adapter(h, base_weights, base_index, dispatch).to(hidden.dtype).view(hidden.shape)
    return (hidden + delta, *output[1:]) if isinstance(output, tuple) else hidden + delta


def router_topk(router: nn.Module, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A router's (top-k weights [T, k], top-k index [T, k]) from its forward output, as its experts receive them.

    Routers return (logits [T, E], topk_weights [T, k], topk_index [T, k]) with the family's scaling applied; some
    append more (Inkling: shared-expert gammas). Llama4's returns (scores [T, E], logits [T, E]): scores are
    sigmoid(logit) at the router's top-k and 0 elsewhere; the same topk on the same logits gives its own index.
    """
    if isinstance(output, tuple) and len(output) == 2 and output[0].shape == output[1].shape:
        scores, logits = output
        index = torch.topk(logits, router.top_k, dim=1).indices  # [T, k]
        return scores.gather(1, index), index  # [T, k], [T, k]
    if not (isinstance(output, tuple) and len(output) >= 3 and output[1].shape == output[2].shape):
        got = [tuple(getattr(t, "shape", ())) for t in output] if isinstance(output, tuple) else type(output).__name__
        raise RuntimeError(
            f"the router {type(router).__name__} returned {got}, not (logits [T, E], top-k weights [T, k], top-k "
            "index [T, k]); PERFT-E and the routing report need the top-k weights and index"
        )
    return output[1], output[2]


def _router_hook(router: nn.Module, args: tuple, output: Any) -> None:
    # Handed to the block hook of the same call and cleared there: no routing state outlives one block forward.
    router._perft_owner._captured = router_topk(router, output)


class _DispatchSink:
    """Handed each call's sort of the (token, expert) pairs by the frozen experts (perft_frozen / perft_nf4), for
    the PERFT-E bank of the same block to route with: cleared by the block hook like the captured routing."""

    def __init__(self, adapter: PerftAdapter):
        self.adapter = weakref.ref(adapter)

    def __call__(self, dispatch: Dispatch) -> None:
        adapter = self.adapter()
        if adapter is not None:
            adapter._dispatch = dispatch


def attach(
    model: nn.Module,
    blocks: Iterable[BlockRef],
    config: PerftConfig,
    recorder: RoutingRecorder | None = None,
) -> list[PerftAdapter]:
    """Add a PERFT adapter beside every given MoE block and freeze everything else. Returns the adapters."""
    if any(hasattr(ref.block, ATTR) for ref in blocks):
        raise RuntimeError("PERFT adapters are already attached to this model; detach them first")
    adapters = []
    for ref in blocks:
        device = next(ref.router.parameters()).device  # some routers wrap a Linear (no .weight of their own)
        adapter = PerftAdapter(config, ref.hidden_size, ref.num_experts, ref.top_k, ref.layer, recorder, device)
        adapter.train(ref.block.training)  # follow the model's mode (dropout off in eval)
        adapter._captured = adapter._dispatch = None
        handles = [ref.block.register_forward_hook(_block_hook, with_kwargs=True)]
        if adapter.needs_base_routing:
            object.__setattr__(ref.router, "_perft_owner", adapter)  # plain attribute: not a submodule
            handles.append(ref.router.register_forward_hook(_router_hook))
        experts = getattr(ref, "experts", None)
        if config.variant == "perft-e" and experts is not None:
            object.__setattr__(experts, DISPATCH_SINK, _DispatchSink(adapter))
            object.__setattr__(adapter, "_experts", experts)
        adapter._handles = handles
        object.__setattr__(adapter, "_router", ref.router)  # a reference, not a submodule (stays frozen)
        ref.block.perft_adapter = adapter
        adapters.append(adapter)
    remember_requires_grad(model)
    freeze_base(model)
    return adapters


def detach(model: nn.Module) -> int:
    """Remove every PERFT adapter and its hooks, and give every base parameter back the ``requires_grad`` it had
    before ``attach``: the model is the base again, as it was found. Returns how many adapters were removed."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, ATTR, None), PerftAdapter)]
    for _, block in found:
        adapter = getattr(block, ATTR)
        for handle in adapter._handles:
            handle.remove()
        if hasattr(adapter._router, "_perft_owner"):
            object.__delattr__(adapter._router, "_perft_owner")
        experts = getattr(adapter, "_experts", None)
        if experts is not None and hasattr(experts, DISPATCH_SINK):
            object.__delattr__(experts, DISPATCH_SINK)
        delattr(block, ATTR)
    if found:
        restore_requires_grad(model)
    return len(found)


def remember_requires_grad(model: nn.Module) -> None:
    """Note every base parameter's ``requires_grad`` before an adapter freezes the base (PERFT's or the LoRA
    baseline's), for ``restore_requires_grad`` when it is removed."""
    _FOUND_REQUIRES_GRAD[model] = {n: p.requires_grad for n, p in model.named_parameters() if not is_adapter_param(n)}


def restore_requires_grad(model: nn.Module) -> None:
    """Give the base parameters back the ``requires_grad`` that ``remember_requires_grad`` noted (if it did)."""
    flags = _FOUND_REQUIRES_GRAD.pop(model, {})
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])


def attached_adapters(model: nn.Module) -> list[PerftAdapter]:
    return [m for m in model.modules() if isinstance(m, PerftAdapter)]


def freeze_base(model: nn.Module) -> None:
    """Only ``perft_`` parameters train; the whole base, its routers included, is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(PREFIX in name)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, by full parameter name, detached and contiguous on the CPU."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if PREFIX in n}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved adapter weights in; any missing, unexpected or mis-shaped tensor is an error naming it."""
    params = {n: p for n, p in model.named_parameters() if PREFIX in n}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(f"adapter weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                got, want = tuple(state[name].shape), tuple(p.shape)
                raise KeyError(f"adapter weight {name} has shape {got}, expected {want}")
            p.copy_(state[name].to(p.device, p.dtype))


def count_params(model: nn.Module) -> dict[str, Any]:
    """Trainable and activated-per-token adapter parameters, in total and per layer (method.md accounting)."""
    adapters = attached_adapters(model)
    per_layer = [
        {"layer": a.layer, "trainable": a.trainable_params(), "activated": a.activated_params()} for a in adapters
    ]
    return {
        "trainable": sum(x["trainable"] for x in per_layer),
        "activated": sum(x["activated"] for x in per_layer),
        "per_layer": per_layer,
    }
