"""``perft plan``: parameter accounting and a training-memory estimate from config.json alone (meta device), and
its rich rendering (``print_plan``; the same numbers are the ``--json`` object)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from perft_cli.adapters import accounting, attach_adapter
from perft_cli.arch import TOP_K_NAMES, config_int
from perft_cli.config import Recipe, ignored_keys
from perft_cli.console import human_bytes, human_count, out, warn
from perft_cli.errors import RecipeError
from perft_cli.modeling import DTYPES, load_config, meta_model

# fp32 gradient, exp_avg and exp_avg_sq per trainable parameter (its fp32 weight is in the "adapters" weight group).
ADAMW_BYTES = 4 + 4 + 4


def activation_bytes(config, micro_batch: int, seq_len: int, checkpointing: bool) -> int:
    """Rough activation memory of one micro-batch (bf16), the logits included.

    Per layer and token a transformer block keeps about 34*D bytes of activations at 16 bits (Korthikanti et al.,
    2022, without the attention-score term, which SDPA does not store); an MoE layer adds its k experts' intermediate
    activations (gate, up, act: 3 * k * I values). With activation checkpointing only each layer's input (2*D bytes
    per token) is kept, plus one layer recomputed at a time. The logits and their gradient are fp32 [B, S, V].
    """
    config = config.get_text_config()  # a multimodal model's language model (the config itself otherwise)
    tokens = micro_batch * seq_len
    d = config.hidden_size
    layers = config.num_hidden_layers
    k = (config_int(config, TOP_K_NAMES) or (None, 1))[1]
    inter = (
        config_int(config, ("moe_intermediate_size", "intermediate_size", "expert_ffn_hidden_size")) or (None, 4 * d)
    )[1]
    per_layer = tokens * (34 * d + 2 * 3 * k * inter)
    logits = 2 * tokens * config.vocab_size * 4
    if checkpointing:
        return layers * tokens * 2 * d + per_layer + logits
    return layers * per_layer + logits


def expert_projection_bytes(model, dtype) -> list[list[int]]:
    """Bytes of each fused expert projection (gate_up, down, ...) in ``dtype``, one list per experts module; a 4-bit
    tensor counts the weights it stands for."""
    import torch

    from perft_cli.quant.experts import EXPERT_WEIGHTS, is_experts_module
    from perft_cli.quant.nf4 import logical_numel

    size = torch.tensor([], dtype=dtype).element_size()
    return [
        [logical_numel(getattr(m, w)) * size for w in EXPERT_WEIGHTS if isinstance(getattr(m, w, None), torch.Tensor)]
        for m in model.modules()
        if is_experts_module(m)
    ]


def nf4_dequant_bytes(model, dtype) -> int:
    """The NF4 experts path dequantizes one fused projection at a time (quant/experts.py), in forward and again in
    backward: the largest one, E x 2I x D in the compute dtype, is held besides the 4-bit weights. Measured at
    OLMoE width on the CPU (benchmarks/gpu_suite.py): without this term plan was 28% under the peak, with it 4.6%
    over (512 MiB for OLMoE, 1.75 GiB for Mixtral-8x7B)."""
    return max((b for module in expert_projection_bytes(model, dtype) for b in module), default=0)


def nf4_load_transient_bytes(model, dtype) -> int:
    """Loading with nf4 quantizes the fused experts as they are read (quant/loader.py): one MoE layer's experts are
    held in the checkpoint's dtype while they become 4-bit. Measured at Mixtral-8x7B width on the CPU
    (benchmarks/real_width_cpu.py): the load's peak was 4,610 MiB against 2,059 MiB of NF4 weights, 2.24x; the
    weights plus one layer's bf16 experts (2,688 MiB) give 4,747 MiB, +3%."""
    return max((sum(module) for module in expert_projection_bytes(model, dtype)), default=0)


def fsdp_weight_bytes(model, quantization: str, world: int, double_quant: bool = False) -> dict[str, int]:
    """Per-rank bytes of the frozen base and the adapter under ``train.sharding: fsdp`` (training/sharding.py).

    Every bf16/fp32 base weight is sharded 1/world; the NF4 weights and the adapter stay whole on every rank
    (FSDP-ignored). Besides its shards a rank holds the units being computed all-gathered whole: two of the largest
    (the one in use and, on CUDA, the next one FSDP2 prefetches; benchmarks/fsdp_memory.py measured one on the CPU,
    where nothing overlaps). ``replicated`` counts what stays whole at its stored size (the adapter in fp32).
    """
    from perft_cli.perft import is_adapter_param
    from perft_cli.quant import estimate_bytes
    from perft_cli.quant.audit import quant_plan
    from perft_cli.training.sharding import shard_units

    plan = quant_plan(model)
    total = estimate_bytes(model, quantization=quantization, double_quant=double_quant)["total_bytes"]
    sharded = {
        id(p): p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if not is_adapter_param(name) and not (quantization == "nf4" and plan.quantized(name))
    }
    units = [sum(sharded.get(id(p), 0) for p in unit.parameters()) for unit in shard_units(model)]
    shardable = sum(sharded.values())
    return {
        "world_size": world,
        "sharded_bytes": -(-shardable // world),
        "replicated_bytes": total - shardable,
        "gathered_bytes": 2 * max(units, default=0),
        "full_bytes": total,
    }


def run_plan(recipe: Recipe, world_size: int | None = None) -> dict[str, Any]:
    """Build the model on the meta device, attach the recipe's adapter, count and estimate. No weights read.

    ``world_size``: the processes of a ``train.sharding: fsdp`` run, whose per-rank memory is estimated (required
    for fsdp; with ``none`` every process holds the whole model and the estimate is per process anyway)."""
    from perft_cli.quant import estimate_bytes

    config, family = load_config(recipe.model)
    model = meta_model(config, DTYPES[recipe.model.dtype])
    acc = accounting(model, attach_adapter(model, recipe.adapter, family))
    weights = estimate_bytes(model, quantization=recipe.model.quantization, double_quant=recipe.model.double_quant)
    optimizer = acc["trainable_params"] * ADAMW_BYTES
    acts = activation_bytes(
        config, recipe.train.micro_batch_size, recipe.data.cutoff_len, recipe.train.gradient_checkpointing
    )
    nf4 = recipe.model.quantization == "nf4"
    dequant = nf4_dequant_bytes(model, DTYPES[recipe.model.dtype]) if nf4 else 0
    load_peak = weights["total_bytes"] + (nf4_load_transient_bytes(model, DTYPES[recipe.model.dtype]) if nf4 else 0)
    fsdp = None
    if recipe.train.sharding == "fsdp":
        if not world_size or world_size < 2:
            raise RecipeError(
                "train.sharding: fsdp: perft plan estimates memory per rank, so it needs the number of processes; "
                "pass --world-size N (N >= 2, all processes of all machines)"
            )
        fsdp = fsdp_weight_bytes(model, recipe.model.quantization, world_size, recipe.model.double_quant)
    held = fsdp["sharded_bytes"] + fsdp["replicated_bytes"] + fsdp["gathered_bytes"] if fsdp else None
    if fsdp and not nf4:  # transformers' FSDP2 loader reads each rank's shards only (modeling.load_model)
        load_peak = fsdp["sharded_bytes"] + fsdp["replicated_bytes"]
    training = (held or weights["total_bytes"]) + optimizer + acts + dequant
    memory = {
        "weights_bytes": weights["total_bytes"],
        "weights_bf16_bytes": weights["bf16_bytes"],
        "adapter_grad_optimizer_bytes": optimizer,
        "activation_bytes": acts,
        "nf4_dequant_bytes": dequant,
        "total_bytes": training,
        # The load can peak above training: with nf4, one layer's experts in bf16 while they are quantized.
        "load_peak_bytes": load_peak,
        "peak_bytes": max(load_peak, training),
        "groups": weights.get("groups") or {k: v for k, v in weights.items() if isinstance(v, dict)},
        # train.sharding: fsdp, per rank (None otherwise). A bf16 base loads per rank (its shards only); an nf4 base
        # is read whole by every rank before sharding, so its load_peak_bytes stays the whole model's.
        "fsdp": fsdp,
        "assumes": {
            "quantization": recipe.model.quantization,
            "micro_batch_size": recipe.train.micro_batch_size,
            "seq_len": recipe.data.cutoff_len,
            "gradient_checkpointing": recipe.train.gradient_checkpointing,
            "sharding": recipe.train.sharding,
            "world_size": world_size,
        },
    }
    unused = ignored_keys(recipe)
    if unused:
        warn(f"set but not used by adapter.variant={recipe.adapter.variant}: {', '.join(unused)}")
    return {
        "model": recipe.model.name_or_path,
        "model_type": config.model_type,
        "family": family.display,
        **acc,
        "memory": memory,
        "unused_keys": unused,
    }


def print_plan(plan: dict[str, Any]) -> None:
    """Parameter accounting and memory estimate of ``perft plan``."""
    t = Table(title=f"perft plan: {plan['model']} ({plan['family']}, {plan['moe_layers']} MoE layers)")
    t.add_column("what")
    t.add_column("parameters", justify="right")
    t.add_column("exact", justify="right")
    rows = [
        (f"adapter trainable ({plan['variant']})", plan["trainable_params"]),
        ("adapter activated per token (routers incl.)", plan["activated_params"]),
        ("base model total (frozen)", plan["base_total_params"]),
        ("base model activated per token", plan["base_activated_params"]),
        ("total", plan["total_params"]),
    ]
    for label, n in rows:
        t.add_row(label, human_count(n), f"{n:,}")
    t.caption = f"trainable = {plan['trainable_percent']:.4f}% of the base"
    out.print(t)
    mem = plan["memory"]
    per = f", per rank of {mem['fsdp']['world_size']} (fsdp)" if mem.get("fsdp") else " (per process)"
    m = Table(title=f"training memory estimate{per}")
    m.add_column("part")
    m.add_column("bytes", justify="right")
    for group, g in mem["groups"].items():
        m.add_row(f"weights: {group}", human_bytes(g["bytes"]))
    m.add_row("[bold]weights[/]", human_bytes(mem["weights_bytes"]))
    fsdp = mem.get("fsdp")
    if fsdp:
        w = fsdp["world_size"]
        m.add_row(f"  fsdp: this rank's shards (1/{w})", human_bytes(fsdp["sharded_bytes"]))
        m.add_row("  fsdp: replicated (NF4 weights, adapter)", human_bytes(fsdp["replicated_bytes"]))
        m.add_row("  fsdp: two units all-gathered", human_bytes(fsdp["gathered_bytes"]))
    m.add_row("adapter gradients + AdamW state", human_bytes(mem["adapter_grad_optimizer_bytes"]))
    m.add_row("activations (rough)", human_bytes(mem["activation_bytes"]))
    if mem.get("nf4_dequant_bytes"):
        m.add_row("one expert projection dequantized (nf4)", human_bytes(mem["nf4_dequant_bytes"]))
    m.add_row("[bold]total (training)[/]", human_bytes(mem["total_bytes"]))
    if mem.get("load_peak_bytes", 0) > mem["total_bytes"]:
        why = "every rank reads the whole nf4 model, then shards it" if fsdp else "one layer's experts in bf16"
        m.add_row(f"[bold]peak while loading[/] ({why})", human_bytes(mem["load_peak_bytes"]))
    a = mem["assumes"]
    m.caption = (
        f"{a['quantization']} weights (all-bf16 size {human_bytes(mem['weights_bf16_bytes'])}), micro-batch "
        f"{a['micro_batch_size']} x {a['seq_len']} tokens, activation checkpointing "
        f"{'on' if a['gradient_checkpointing'] else 'off'}"
    )
    out.print(m)
