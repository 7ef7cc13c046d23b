"""Where the bytes of a model are: per module group, for a loaded model (audit) and a meta model (estimate).

Both walk the same parameters with the same grouping and the same quantization plan, and count a 4-bit tensor as
packed data + fp32 absmax + NF4 code table (+ offset, uint8 absmax, nested absmax and nested code table with double
quantization), so ``perft plan``'s estimate and ``perft train --dry-run``'s audit agree. Parameters are counted as
logical weights (a packed tensor of n weights counts n). Buffers (rotary tables, DeepSeek's correction bias) are
not counted: they are tiny and no quantization touches them.

Dtypes are the parameters' own, not assumed: transformers loads what a model class lists in
``_keep_in_fp32_modules_strict`` (e.g. DeepSeek's ``gate.weight`` router) in float32 when asked for bf16 or fp16, and
what it lists in ``_keep_in_fp32_modules`` in float32 when asked for fp16; the audit reads that off the loaded
tensors, and the estimate applies the same rule to the meta model's unquantized parameters.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from perft_cli.errors import ModelError
from perft_cli.perft.inject import is_adapter_param
from perft_cli.quant.experts import EXPERT_WEIGHTS, is_experts_module
from perft_cli.quant.nf4 import BLOCKSIZE, NESTED_BLOCKSIZE, QUANT_TYPE, is_nf4, logical_numel, packed_bytes

# norms_other holds norms and whatever else is left, e.g. DeepSeek's dense first-layer MLPs (quantized with nf4).
GROUPS = ("attention", "routed_experts", "shared_experts", "router", "embeddings_head", "norms_other", "adapters")
QUANTIZATIONS = ("none", "nf4")
SHARED_ATTRS = ("shared_expert", "shared_experts", "shared_expert_gate", "shared_mlp")  # see arch (shared_attrs)
# bitsandbytes' CPU kernels misbehave on tiny Linear shapes (platform.md: Qwen's shared_expert_gate Linear(H, 1));
# such layers hold next to nothing, so they stay unquantized.
MIN_LINEAR_IN, MIN_LINEAR_OUT = 64, 32


def _is_router(module: nn.Module) -> bool:
    # Every router class carries num_experts, top_k (platform.md) and its own weight; a block may carry the first two.
    has_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
    return has_weight and hasattr(module, "top_k") and hasattr(module, "num_experts") and not is_experts_module(module)


@dataclass
class QuantPlan:
    """Each parameter's group, and what NF4 loading quantizes: Linear layers (by module) and expert weights."""

    groups: dict[str, str] = field(default_factory=dict)  # parameter name -> group
    quant_linears: list[str] = field(default_factory=list)  # nn.Linear modules that become Linear4bit
    skip_linears: list[str] = field(default_factory=list)  # nn.Linear modules that stay unquantized
    expert_weights: list[str] = field(default_factory=list)  # fused 3D routed-expert weights

    @cached_property
    def _quantized_names(self) -> set[str]:
        return set(self.expert_weights) | {f"{m}.weight" for m in self.quant_linears}

    def quantized(self, name: str) -> bool:
        """Would NF4 loading store parameter ``name`` in 4 bits?"""
        return name in self._quantized_names


def quant_plan(model: nn.Module) -> QuantPlan:
    """Group every parameter and decide what NF4 quantizes; works on meta, loaded and wrapped models alike."""
    modules = dict(model.named_modules())
    prefixes: dict[str, str] = {}  # module name -> group, for subtrees
    for name, m in modules.items():
        if is_experts_module(m):
            prefixes[name] = "routed_experts"
            block = name.rpartition(".")[0]
            for attr in SHARED_ATTRS:
                if f"{block}.{attr}" in modules:
                    prefixes[f"{block}.{attr}"] = "shared_experts"
        elif _is_router(m):
            prefixes[name] = "router"
        elif isinstance(m, nn.Embedding) or name.rpartition(".")[2] == "lm_head":
            prefixes[name] = "embeddings_head"
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in modules.items():
        if out_emb is not None and m is out_emb:
            prefixes[name] = "embeddings_head"

    def group_of(module_name: str, param_name: str) -> str:
        if is_adapter_param(param_name):
            return "adapters"
        parts = module_name.split(".") if module_name else []
        for i in range(len(parts), 0, -1):  # the innermost grouped ancestor wins
            g = prefixes.get(".".join(parts[:i]))
            if g is not None:
                return g
        if any("attn" in p or "attention" in p for p in parts):
            return "attention"
        return "norms_other"

    plan = QuantPlan()
    for name, _ in model.named_parameters():
        module_name = name.rpartition(".")[0]
        plan.groups[name] = group_of(module_name, name)
        leaf = name.rpartition(".")[2]
        if plan.groups[name] == "routed_experts" and leaf in EXPERT_WEIGHTS:
            plan.expert_weights.append(name)
    for name, m in modules.items():
        if type(m) is not nn.Linear:  # exactly what transformers' replace_with_bnb_linear converts
            continue
        group = group_of(name, f"{name}.weight")
        tiny = m.in_features < MIN_LINEAR_IN or m.out_features < MIN_LINEAR_OUT
        keep = group in ("router", "embeddings_head", "adapters") or tiny
        (plan.skip_linears if keep else plan.quant_linears).append(name)
    return plan


def _nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes bitsandbytes allocates for an NF4 tensor of ``numel`` weights (see nf4.packed_bytes)."""
    blocks = math.ceil(numel / BLOCKSIZE)
    code = 16 * 4  # the 16-entry NF4 table, fp32, one per tensor
    if not double_quant:
        return (numel + 1) // 2 + blocks * 4 + code
    nested_blocks = math.ceil(blocks / NESTED_BLOCKSIZE)
    return (numel + 1) // 2 + blocks + 4 + nested_blocks * 4 + 256 * 4 + code


def _load_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype ``model`` was built in: the floating dtype holding most of its (non-4-bit) weights."""
    counts: Counter[torch.dtype] = Counter()
    for p in model.parameters():
        if p.is_floating_point() and not is_nf4(p):
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else None


def fp32_kept(model: nn.Module, dtype: torch.dtype | None) -> re.Pattern | None:
    """Parameter names that transformers loads in float32 when ``model`` is loaded in ``dtype`` (None: none).

    The same rule as ``PreTrainedModel._get_dtype_plan`` and its use in ``core_model_loading``: the class's
    ``_keep_in_fp32_modules_strict`` at bf16/fp16 and its ``_keep_in_fp32_modules`` at fp16, as globs (``*`` is any
    text, the rest a regex) searched anywhere in the parameter name. A model's post_init gathers its submodels' lists.
    """
    patterns: set[str] = set()
    if dtype == torch.float16:
        patterns |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        patterns |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in sorted(patterns)))


def _dtype_name(t: torch.Tensor) -> str:
    return QUANT_TYPE if is_nf4(t) else str(t.dtype).removeprefix("torch.")


def _summarise(rows: list[tuple[str, str, int, int, str]], quantization: str, unquantized: list[str]) -> dict:
    """rows: (name, group, params, bytes, dtype) -> the audit dict."""
    result: dict = {"quantization": quantization}
    for g in GROUPS:
        sel = [r for r in rows if r[1] == g]
        params, nbytes = sum(r[2] for r in sel), sum(r[3] for r in sel)
        result[g] = {
            "params": params,
            "bytes": nbytes,
            "dtypes": sorted({r[4] for r in sel}),
            "bytes_per_param": nbytes / params if params else 0.0,
        }
    result["total_params"] = sum(r[2] for r in rows)
    result["total_bytes"] = sum(r[3] for r in rows)
    result["bf16_bytes"] = 2 * result["total_params"]
    result["unquantized_routed_weights"] = unquantized
    return result


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"unknown quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")


def audit(model: nn.Module, *, quantization: str) -> dict:
    """Params, bytes, dtypes and bytes/param per group of a loaded model, plus totals and its size in bf16.

    Returns ``{group: {"params", "bytes", "dtypes", "bytes_per_param"} for group in GROUPS}`` plus ``quantization``
    (what was asked for: "none" or "nf4"), ``total_params``, ``total_bytes``, ``bf16_bytes`` and
    ``unquantized_routed_weights`` (names of routed-expert weights not in 4 bits), all JSON-serialisable.
    """
    _check_quantization(quantization)
    plan = quant_plan(model)
    rows = []
    for name, p in model.named_parameters():
        nbytes = packed_bytes(p) if is_nf4(p) else p.numel() * p.element_size()
        rows.append((name, plan.groups[name], logical_numel(p), nbytes, _dtype_name(p)))
    params = dict(model.named_parameters())
    unquantized = [n for n in plan.expert_weights if not is_nf4(params[n])]
    return _summarise(rows, quantization, unquantized)


def estimate_bytes(
    meta_model: nn.Module, *, quantization: str, double_quant: bool = False, dtype: torch.dtype | None = None
) -> dict:
    """The audit that loading ``meta_model``'s checkpoint with ``quantization`` would give, without any weights.

    Unquantized parameters keep the meta model's dtypes (build it in the dtype you will load with; ``dtype``
    defaults to the one most of its weights have), except those transformers keeps in float32 at that dtype
    (``fp32_kept``, e.g. DeepSeek's router), which count 4 bytes each as they will once loaded.
    """
    _check_quantization(quantization)
    plan = quant_plan(meta_model)
    keep_fp32 = fp32_kept(meta_model, dtype or _load_dtype(meta_model))
    rows = []
    for name, p in meta_model.named_parameters():
        numel = logical_numel(p)
        if quantization == "nf4" and (plan.quantized(name) or is_nf4(p)):
            rows.append((name, plan.groups[name], numel, _nf4_bytes(numel, double_quant), QUANT_TYPE))
        elif keep_fp32 is not None and p.is_floating_point() and keep_fp32.search(name):
            rows.append((name, plan.groups[name], numel, numel * 4, "float32"))
        else:
            rows.append((name, plan.groups[name], numel, numel * p.element_size(), _dtype_name(p)))
    unquantized = [] if quantization == "nf4" else list(plan.expert_weights)
    return _summarise(rows, quantization, unquantized)


def check_audit(audit_dict: dict, quantization: str) -> None:
    """Raise ModelError if ``nf4`` was asked for and a routed-expert weight is not stored in 4 bits."""
    _check_quantization(quantization)
    if quantization != "nf4":
        return
    bad = audit_dict.get("unquantized_routed_weights", [])
    if bad:
        raise ModelError(
            f"nf4 was requested but {len(bad)} routed-expert weight(s) are not 4-bit (first: {bad[0]}, "
            f"{audit_dict['routed_experts']['bytes_per_param']:.2f} B/param); load the model with load_model_nf4"
        )
    if audit_dict["routed_experts"]["params"] == 0:
        raise ModelError("nf4 was requested but the model has no routed experts to quantize")
