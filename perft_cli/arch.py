"""MoE discovery: the MoE block, its router and its fused experts in any decoder layer of a transformers-5 model.

transformers 5 standardised the parts PERFT needs (shared/docs/platform.md), so they are found by structure, not by
name: the routed experts are the module its ``@use_experts_implementation`` decorator marks (``has_gate``,
``is_transposed``, ``num_experts``), the MoE block is that module's parent, and the router is the block's child that
carries ``top_k`` and ``num_experts`` and returns ``(router_logits [T, E], topk_weights [T, k], topk_index [T, k])``.
A decoder layer without such a block (a dense FFN, a Mamba or linear-attention layer's MLP) gets no adapter.

``OVERRIDES`` holds only what structure cannot tell (display names, LoRA target names, tuple outputs),
``OUTSIDE_INTERFACE`` the families accepted although their experts bypass the experts interface (Llama4), and
``REFUSED`` the families whose blocks are found but do not fit PERFT, each with the one line the refusal prints.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from functools import cache

from torch import nn

from perft_cli.errors import ModelError

# The attribute names configs use for the expert count and the top-k (the router's own attributes come first).
EXPERT_COUNT_NAMES = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
TOP_K_NAMES = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "top_k_experts", "top_k")
# With multi-head latent attention (kv_lora_rank set), the query goes through q_proj or q_a_proj/q_b_proj and keys
# and values through kv_b_proj (platform.md, peft section); the LoRA baseline keeps those that exist.
MLA_LORA_TARGETS = ("q_proj", "q_b_proj", "kv_b_proj")


def config_int(config, names: tuple[str, ...]) -> tuple[str, int] | None:
    """The first of ``names`` that ``config`` holds as an int, with its value (None: none of them)."""
    for name in names:
        try:
            value = getattr(config, name, None)
        except RuntimeError:  # heterogeneous configs refuse to read a per-layer attribute globally
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    return None


@dataclass(frozen=True)
class MoEFamily:
    """What perft knows of one model type. Blocks, routers and experts are found by ``find_moe_blocks``."""

    model_type: str
    display: str
    block_attr: str = "mlp"  # where transformers puts the block (informational: discovery finds it by structure)
    router_attr: str = "gate"  # the router's attribute inside the block (informational, as above)
    experts_attr: str = "experts"
    shared_attrs: tuple[str, ...] = ()  # shared-expert modules inside the block (always active)
    tuple_output: bool = False  # the block returns (hidden, extra) instead of hidden
    returns_aux_loss: bool = True  # transformers adds the load-balancing loss when asked for router logits
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # attention projections for the LoRA baseline


# The seven families perft was first written for, as they were: their names are used by tests and docs.
FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f
    for f in (
        MoEFamily("mixtral", "Mixtral"),
        MoEFamily("olmoe", "OLMoE"),
        MoEFamily("qwen2_moe", "Qwen2-MoE", shared_attrs=("shared_expert", "shared_expert_gate")),
        MoEFamily("qwen3_moe", "Qwen3-MoE"),
        MoEFamily("deepseek_v2", "DeepSeek-V2", shared_attrs=("shared_experts",), returns_aux_loss=False),
        MoEFamily(
            "deepseek_v3",
            "DeepSeek-V3",
            shared_attrs=("shared_experts",),
            returns_aux_loss=False,
            lora_targets=MLA_LORA_TARGETS,
        ),
        MoEFamily("gpt_oss", "gpt-oss", router_attr="router", tuple_output=True),
    )
}

# What structure cannot tell about the other families (everything else is inferred by ``_infer_family``).
OVERRIDES: dict[str, dict] = {
    "qwen3_next": dict(display="Qwen3-Next"),
    "qwen3_5_moe": dict(display="Qwen3.5-MoE"),
    "qwen3_5_moe_text": dict(display="Qwen3.5-MoE (text)"),
    "glm4_moe": dict(display="GLM-4.5/4.6/4.7"),
    "glm4_moe_lite": dict(display="GLM-4.7-Flash"),
    "deepseek_v32": dict(display="DeepSeek-V3.2"),
    "deepseek_v4": dict(display="DeepSeek-V4", lora_targets=("q_b_proj", "kv_proj")),  # one shared key/value head
    "ernie4_5_moe": dict(display="ERNIE-4.5-MoE"),
    "hunyuan_v1_moe": dict(display="Hunyuan-MoE", shared_attrs=("shared_mlp",)),
    "minimax": dict(display="MiniMax"),
    "minimax_m2": dict(display="MiniMax-M2"),
    "granitemoe": dict(display="Granite-MoE"),
    "granitemoeshared": dict(display="Granite-MoE-Shared"),
    "granitemoehybrid": dict(display="Granite-MoE-Hybrid"),
    "phimoe": dict(display="PhiMoE"),
    "flex_olmo": dict(display="FlexOlmo"),
    "nemotron_h": dict(display="Nemotron-H"),
    "jamba": dict(display="Jamba"),
    # Inkling2's q_proj / v_proj wrap their Linear as .linear (with a norm); peft matches the dotted suffix.
    "inkling2_text": dict(display="Inkling2", lora_targets=("q_proj.linear", "v_proj.linear")),
    "inkling2_loop_text": dict(display="Inkling2-Loop", lora_targets=("q_proj.linear", "v_proj.linear")),
    "llama4": dict(display="Llama4", block_attr="feed_forward", router_attr="router", tuple_output=True),
    "llama4_text": dict(display="Llama4", block_attr="feed_forward", router_attr="router", tuple_output=True),
    "zaya": dict(display="ZAYA", lora_targets=("q_proj", "v_proj_current", "v_proj_delayed")),
}

# Families whose experts go through transformers' experts interface but whose block does not fit PERFT as built here.
# The line is the whole refusal; tests and scripts/families_table.py print the same text.
_GEMMA4 = (
    "model type {!r}: the experts of each MoE layer are called by the decoder layer Gemma4TextDecoderLayer itself, "
    "beside its dense MLP and between their own norms, not by an MoE block module that PERFT could add its adapter "
    "beside"
)
REFUSED: dict[str, str] = {t: _GEMMA4.format(t) for t in ("gemma4", "gemma4_text")}

# Families whose experts do not go through the experts interface but whose block fits PERFT all the same.
# Llama4: Llama4TextExperts holds fused 3-D weights; its router returns (dense scores [T, E], logits [T, E]),
# which the PERFT-E hook turns into the top-k weights and index the block uses (perft/inject.py).
OUTSIDE_INTERFACE = ("llama4", "llama4_text")


def _causal_lm_class(model_type: str):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


@cache
def _modeling_source(model_type: str) -> str:
    """The source of the model type's modeling code, or "" when it has none (or is unknown).

    An alias type (its config maps onto another family's causal-LM class, e.g. sarvam_mla -> DeepseekV3ForCausalLM)
    reads that class's module too. Files are read, not imported: importing every modeling module takes seconds.
    """
    import inspect
    from pathlib import Path

    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    folder = Path(transformers.__file__).parent / "models" / model_type_to_module_name(model_type)
    text = []
    with contextlib.suppress(OSError):
        text = [f.read_text(encoding="utf-8") for f in sorted(folder.glob("modeling_*.py"))]
    lm_class = _causal_lm_class(model_type)
    if lm_class and not text:  # no modeling code of its own (importing the class is slow: only then)
        with contextlib.suppress(AttributeError, ImportError, OSError, TypeError):
            text.append(inspect.getsource(inspect.getmodule(getattr(transformers, lm_class))))
    return "\n".join(text)


def uses_experts_interface(model_type: str) -> bool:
    """Does the model type's modeling code route experts through ``@use_experts_implementation``?"""
    return "use_experts_implementation" in _modeling_source(model_type)


def _display(model_type: str, lm_class: str | None) -> str:
    return re.sub(r"ForCausalLM$", "", lm_class) if lm_class else model_type


def _infer_family(model_type: str) -> MoEFamily:
    lm_class = _causal_lm_class(model_type)
    source = _modeling_source(model_type)
    kwargs: dict = dict(display=_display(model_type, lm_class))
    # transformers adds the aux loss in the ForCausalLM forward through load_balancing_loss_func (DeepSeek has none).
    kwargs["returns_aux_loss"] = "load_balancing_loss_func(" in source
    if "kv_b_proj" in source:  # multi-head latent attention (DeepSeek style)
        kwargs["lora_targets"] = MLA_LORA_TARGETS
    kwargs.update(OVERRIDES.get(model_type, {}))
    return MoEFamily(model_type, **kwargs)


def supported_model_types() -> list[str]:
    """Every model type of the installed transformers that ``family_for`` accepts: a causal LM whose experts go
    through the experts interface (or one of OUTSIDE_INTERFACE), not REFUSED."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    found = [t for t in CONFIG_MAPPING_NAMES if t in FAMILIES or _candidate(t)]
    return [t for t in found if t not in REFUSED]


def _candidate(model_type: str) -> bool:
    if _causal_lm_class(model_type) is None:  # checked first: reading sources is the slow part
        return False
    return model_type in OUTSIDE_INTERFACE or uses_experts_interface(model_type)


def supported_list() -> str:
    """The first seven families by name and how many more model types are accepted (one line, for refusals)."""
    known = [f"{f.display} ({t})" for t, f in FAMILIES.items()]
    others = len([t for t in supported_model_types() if t not in FAMILIES])
    return ", ".join(known) + f" and {others} more MoE model types (scripts/families_table.py lists them)"


def family_for(model_type: str | None) -> MoEFamily:
    """The family for a config's ``model_type``, or a ModelError saying in one line why it cannot be used."""
    model_type = model_type or ""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in REFUSED:
        raise ModelError(REFUSED[model_type])
    if _candidate(model_type):
        return _infer_family(model_type)
    if uses_experts_interface(model_type):
        raise ModelError(
            f"model type {model_type!r} has MoE experts but transformers has no causal-LM class for it "
            "(AutoModelForCausalLM; a multimodal model or a part of one); perft fine-tunes causal language models"
        )
    raise ModelError(
        f"model type {model_type!r} is not a supported MoE family (its modeling code has no experts going through "
        f"transformers' experts interface); supported: {supported_list()}. Pick a model of one of these families."
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers``, ``backbone.layers``), through a peft wrapper too."""
    inner = model
    for _ in range(5):  # PeftModel -> LoraModel -> CausalLM -> base model (-> language model)
        layers = getattr(inner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
        nxt = None
        for attr in ("model", "base_model", "backbone", "language_model", "transformer"):
            nxt = getattr(inner, attr, None)
            if isinstance(nxt, nn.Module) and nxt is not inner:
                break
            nxt = None
        if nxt is None:
            break
        inner = nxt
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__}; is it a causal language model?")


def is_experts(module: nn.Module) -> bool:
    """A fused routed-experts module: what ``@use_experts_implementation`` sets on every instance, or (outside the
    interface, Llama4) an expert count with fused 3-D weights ``down_proj [E, ., .]``."""
    if hasattr(module, "is_transposed") and hasattr(module, "has_gate") and hasattr(module, "num_experts"):
        return True
    n, w = getattr(module, "num_experts", None), getattr(module, "down_proj", None)
    return isinstance(n, int) and isinstance(w, nn.Parameter) and w.dim() == 3 and w.shape[0] == n


def _is_router(module: nn.Module) -> bool:
    # Every router class carries top_k and num_experts (platform.md) besides its weight; the block may carry them too.
    return hasattr(module, "top_k") and hasattr(module, "num_experts") and not is_experts(module)


@dataclass
class MoEBlockRef:
    """One MoE block of a model and its parts."""

    layer: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    name: str  # qualified module name of the block, e.g. "model.layers.3.mlp"

    @property
    def num_experts(self) -> int:
        return int(getattr(self.router, "num_experts", None) or self.experts.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def hidden_size(self) -> int:
        return int(_router_weight(self.router).shape[-1])

    @property
    def shared(self) -> list[str]:
        """The block's other parts with weights (shared experts, their gates): always active, left frozen."""
        skip = (self.router, self.experts)
        return [
            n
            for n, m in self.block.named_children()
            if m not in skip and any(True for _ in m.parameters()) and not type(m).__name__.endswith("Norm")
        ]


def _router_weight(router: nn.Module):
    """The router's [E, D] weight: its own ``weight`` or, for routers wrapping a Linear, the first 2-D parameter."""
    w = getattr(router, "weight", None)
    if w is None:
        w = next((p for p in router.parameters() if p.dim() == 2), None)
    if w is None:
        raise ModelError(f"the router {type(router).__name__} has no [experts, hidden] weight")
    return w


def _block_parts(layer: nn.Module) -> list[tuple[str, nn.Module, nn.Module, nn.Module | None]]:
    """(block name in the layer, block, experts, router or None) for every experts module in one decoder layer."""
    parts = []
    for name, module in layer.named_modules():
        if not is_experts(module) or not name:
            continue
        block_name = name.rpartition(".")[0]
        block = layer.get_submodule(block_name) if block_name else layer
        # An attached PERFT adapter (block.perft_adapter) carries top_k and num_experts too: not a router.
        routers = [m for n, m in block.named_children() if not n.startswith("perft_") and _is_router(m)]
        parts.append((block_name, block, module, routers[0] if len(routers) == 1 else None))
    return parts


def find_moe_blocks(model: nn.Module, family: MoEFamily | None = None) -> list[MoEBlockRef]:
    """Every MoE block of the model, in layer order. Dense, Mamba and linear-attention FFN layers are skipped."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    family = family or family_for(model_type)
    what = f"{family.model_type} ({type(model).__name__})"
    names = {id(m): n for n, m in model.named_modules()}
    refs = []
    for i, layer in enumerate(decoder_layers(model)):
        parts = _block_parts(layer)
        if not parts:
            continue  # no routed experts here: gets no PERFT adapter (method.md, parameter accounting)
        if len(parts) > 1:
            raise ModelError(
                f"{what}: decoder layer {i} holds {len(parts)} fused experts modules "
                f"({', '.join(p[0] or '<layer>' for p in parts)}); PERFT adapts one MoE block per layer"
            )
        block_name, block, experts, router = parts[0]
        if block is layer:
            raise ModelError(
                f"{what}: the experts of layer {i} are called by the decoder layer {type(layer).__name__} itself, "
                "not by an MoE block module that PERFT could add its adapter beside"
            )
        if router is None:
            raise ModelError(
                f"{what}: the MoE block {type(block).__name__} of layer {i} has no router module beside its experts "
                "(a child carrying top_k and num_experts that returns router logits, top-k weights and top-k index)"
            )
        _router_weight(router)
        k, e = getattr(router, "top_k", None), getattr(router, "num_experts", None) or experts.num_experts
        if not (isinstance(k, int) and isinstance(e, int) and 1 <= k <= e):
            raise ModelError(
                f"{what}: the router of layer {i} has top_k={k!r} of num_experts={e!r}; set the model's top-k "
                "(e.g. num_experts_per_tok) and expert count in its config.json"
            )
        refs.append(MoEBlockRef(i, block, router, experts, names.get(id(block), f"layers.{i}.{block_name}")))
    if not refs:
        raise ModelError(
            f"{what} has no MoE blocks: no decoder layer holds a fused experts module (a transformers experts class "
            "with @use_experts_implementation) beside a router; PERFT needs a Mixture-of-Experts model"
        )
    return refs
