"""``train.sharding: fsdp``: the frozen base sharded across ranks by FSDP2 (``fully_shard``), the adapters replicated.

Design. The trainable state is tiny (an adapter is ~0.1-1% of the base), the frozen base is what does not fit. So:

- Each decoder layer, the input embedding and the untied LM head are one FSDP2 unit each, then the root (the final
  norm). A rank keeps 1/world of every bf16 weight and all-gathers one unit at a time for forward and backward.
- The adapter parameters (``perft_`` / ``lora_``) are ``ignored_params``: every rank holds them whole, as under DDP,
  and ``average_gradients`` all-reduces their gradients once per optimizer step. So the optimizer, the checkpoint
  and ``--resume`` see plain full tensors: a saved adapter can never hold 1/world of a tensor (axolotl#3772), and
  fused-expert adapters never see sharded shapes (peft#3080).
- The NF4 weights (bitsandbytes ``Params4bit``: packed uint8 plus a ``QuantState`` held beside the tensor) are
  ignored too, i.e. replicated: FSDP2 would all-gather the packed bytes into a plain tensor and drop the
  QuantState that dequantizes them. Their cost is measured by benchmarks/fsdp_memory.py and estimated by perft plan.
  (The way to shard them: a floating ``quant_storage`` and the QuantState kept on the module, as bitsandbytes'
  Linear4bit does for FSDP; perft's fused-expert path, quant/experts.py, reads it from the weight.)
- A unit is all-gathered whole whatever the router picks, so an expert that receives no tokens on one rank skips no
  collective (the ZeRO-3 hang of per-expert gathering).

Why ``fully_shard`` is called here rather than through Accelerate's ``FullyShardedDataParallelPlugin(fsdp_version=2)``:
that path is configured by the launcher (which modules become units, by class name, in the config file), so a
``torchrun`` launch or an Accelerate config without FSDP would silently train unsharded; and it shards the trainable
adapter too, so the optimizer state and every save hold DTensors that must be gathered correctly (the bug class of
axolotl#3772). Here the recipe decides, every launcher behaves the same, and only the frozen base is sharded;
Accelerate keeps the process group, the device, autocast and gradient accumulation.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from perft_cli.config import Recipe
from perft_cli.errors import PerftError, RecipeError


class RanksDifferError(PerftError):
    """The processes of one run hold different adapters (a bug, never a user error): stop before training on."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_sharding(recipe: Recipe) -> None:
    """``sharding: fsdp`` needs several processes and owns placement: one line before anything loads."""
    if recipe.train.sharding != "fsdp":
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # set by an Accelerate FSDP config
            raise RecipeError(
                "the launch asks Accelerate for FSDP (distributed_type: FSDP in its config), but the recipe has "
                "train.sharding: none; perft shards the frozen base itself: add --set train.sharding=fsdp (the "
                "config's fsdp_* settings are not read)"
            )
        return
    if recipe.model.device_map:
        raise RecipeError(
            f"train.sharding: fsdp shards the model across processes; model.device_map={recipe.model.device_map!r} "
            "places it on one process's GPUs: use one of them (unset model.device_map, or set train.sharding: none)"
        )
    if world_size() < 2:
        raise RecipeError(
            "train.sharding: fsdp shards the frozen base across processes, but this is one process; launch with "
            "torchrun --nproc_per_node N -m perft_cli train ... (or accelerate launch), or set train.sharding: none"
        )


def replicated_params(model: nn.Module) -> set[nn.Parameter]:
    """What every rank holds whole: the trainable adapter and the NF4 (``Params4bit``) weights."""
    from bitsandbytes.nn import Params4bit

    return {p for p in model.parameters() if p.requires_grad or isinstance(p, Params4bit)}


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units before the root: decoder layers, input embedding, untied LM head."""
    units = list(model.get_decoder().layers)
    units.append(model.get_input_embeddings())
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:  # tied: one tensor, one unit
        units.append(head)
    return units


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place across all ranks (FSDP2); returns it. Call after the adapter is attached and
    activation checkpointing enabled, before the first forward."""
    from bitsandbytes.nn import Params4bit
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    keep = replicated_params(model)
    if not isinstance(model, FSDPModule):  # a bf16 / fp32 base comes sharded from transformers' loader (modeling.py)
        mesh = init_device_mesh(device.type, (world_size(),))
        for unit in shard_units(model):
            # reshard_after_forward: each unit is gathered again for backward, so at most ~2 units are whole at once.
            fully_shard(unit, mesh=mesh, reshard_after_forward=True, ignored_params=keep)
        fully_shard(model, mesh=mesh, ignored_params=keep)
    for p in keep:  # fully_shard moves what it manages to the mesh's device, never what it ignores
        # A Params4bit's QuantState would stay behind if only its packed data moved: the NF4 loader already put
        # both on this rank's current device (Accelerate set it before the load).
        if p.device != device and not isinstance(p, Params4bit):
            p.data = p.data.to(device)
    return model


def average_gradients(params: list[nn.Parameter]) -> None:
    """The mean of every rank's adapter gradients, in one all-reduce (what DDP does for a replicated model).

    Under FSDP the adapters are ignored parameters: nothing reduces their gradients but this. A parameter that got
    no gradient on a rank counts as zeros there, so every rank sends the same buffer shape.
    """
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # [sum of numels], float32 on the wire
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def tensor_checksum(t: torch.Tensor) -> int:
    """A checksum of a tensor's bits: the sum of its elements read as integers (exact; a changed value shows unless
    another one changed by the very opposite amount)."""
    t = t.detach().reshape(-1).contiguous()
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return int(t.view(ints).sum(dtype=torch.int64))


def check_ranks_agree(named: list[tuple[str, torch.Tensor]], device: torch.device, what: str) -> None:
    """Every rank holds the same adapter (bit for bit), or a RanksDifferError naming the first tensor that
    differs. Two small all-reduces (min and max of one int64 per tensor); nothing to do on one process.

    Ranks that silently train different adapters while the loss looks fine (transformers#48792) fail here.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    sums = torch.tensor([tensor_checksum(t) for _, t in named], dtype=torch.int64, device=device)  # [n tensors]
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = (low != high).nonzero().flatten().tolist()
    if differ:
        first = named[differ[0]][0]
        raise RanksDifferError(
            f"after {what}, the {dist.get_world_size()} processes hold different adapters ({len(differ)} of "
            f"{len(named)} tensors differ, first {first}): their gradients were not averaged; this is a perft bug, "
            "please report it with the recipe and the launch command"
        )


def frozen_base_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the frozen base this rank holds: ``sharded`` (its local shards), ``replicated`` (whole on every rank,
    e.g. NF4 weights) and ``full`` (what one process would hold). A 4-bit tensor counts its packed bytes."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from perft_cli.quant.nf4 import is_nf4, packed_bytes

    for m in model.modules():  # the root keeps its parameters gathered after a forward: count them as stored
        if isinstance(m, FSDPModule):
            m.reshard()
    out = {"sharded": 0, "replicated": 0, "full": 0}
    for p in model.parameters():
        if p.requires_grad:
            continue
        if isinstance(p, DTensor):
            local = p.to_local()
            out["sharded"] += local.numel() * local.element_size()
            out["full"] += p.numel() * p.element_size()
            continue
        size = packed_bytes(p) if is_nf4(p) else p.numel() * p.element_size()
        out["replicated"] += size
        out["full"] += size
    return out


def even_eval_batches(n_items: int, rank: int, world: int, size: int) -> list[list[int]]:
    """This rank's micro-batches of ``n_items`` held-out examples, the same number on every rank.

    Under FSDP every forward is a collective (each unit is all-gathered), so a rank that ran one forward fewer would
    leave the others waiting forever. A rank short of examples gets empty lists: it runs a forward on padding and
    counts nothing (``step.evaluate``).
    """
    mine = list(range(rank, n_items, world))
    busiest = -(-n_items // world)  # ceil: examples of the rank with the most
    rounds = -(-busiest // size)
    return [mine[s * size : (s + 1) * size] for s in range(rounds)]
