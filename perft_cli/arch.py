"""The MoE families perft supports: where the MoE block, its router and its experts live in transformers 5.

All families checked here share one shape (see shared/docs/platform.md): the decoder layer holds a sparse block whose
router returns ``(router_logits [T, E], topk_weights [T, k], topk_index [T, k])`` and whose fused experts are called as
``experts(hidden [T, D], topk_index, topk_weights)``. The router module carries ``num_experts`` and ``top_k``.
Llama4 is left out: its router returns dense scores instead of top-k weights and its block flattens the output.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from perft_cli.errors import ModelError


@dataclass(frozen=True)
class MoEFamily:
    """Where a family keeps its MoE parts, by attribute name."""

    model_type: str
    display: str
    block_attr: str = "mlp"  # attribute of each decoder layer holding the MoE block
    router_attr: str = "gate"  # attribute of the block holding the router
    experts_attr: str = "experts"  # attribute of the block holding the fused experts
    shared_attrs: tuple[str, ...] = ()  # shared-expert modules inside the block (always active)
    tuple_output: bool = False  # the block returns (hidden, extra) instead of hidden
    returns_aux_loss: bool = True  # transformers adds the load-balancing loss when asked for router logits
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # attention projections for the LoRA baseline


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
            # With q_lora_rank set, DeepSeek's query goes through q_a_proj/q_b_proj and keys/values through kv_b_proj.
            lora_targets=("q_proj", "q_b_proj", "kv_b_proj"),
        ),
        MoEFamily("gpt_oss", "gpt-oss", router_attr="router", tuple_output=True),
    )
}


def supported_list() -> str:
    return ", ".join(f"{f.display} ({t})" for t, f in FAMILIES.items())


def family_for(model_type: str | None) -> MoEFamily:
    """The family for a config's ``model_type``, or a ModelError naming the supported ones."""
    fam = FAMILIES.get(model_type or "")
    if fam is None:
        raise ModelError(
            f"model type {model_type!r} is not a supported MoE family; supported: {supported_list()}. "
            "Pick a model of one of these families."
        )
    return fam


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers``), through a peft wrapper too."""
    inner = model
    for _ in range(4):  # PeftModel -> LoraModel -> CausalLM -> base model
        layers = getattr(inner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
        inner = getattr(inner, "model", None) or getattr(inner, "base_model", None)
        if inner is None:
            break
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__}; is it a causal language model?")


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
        return int(self.router.num_experts)

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def hidden_size(self) -> int:
        return int(self.router.weight.shape[-1])


def find_moe_blocks(model: nn.Module, family: MoEFamily | None = None) -> list[MoEBlockRef]:
    """Every MoE block of the model, in layer order. Dense layers (DeepSeek's first layers) are skipped."""
    family = family or family_for(getattr(getattr(model, "config", None), "model_type", None))
    names = {id(m): n for n, m in model.named_modules()}
    refs = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, family.block_attr, None)
        router = getattr(block, family.router_attr, None) if block is not None else None
        experts = getattr(block, family.experts_attr, None) if block is not None else None
        if router is None or experts is None:
            continue  # a dense FFN layer: gets no PERFT adapter (method.md, parameter accounting)
        refs.append(MoEBlockRef(i, block, router, experts, names.get(id(block), f"layers.{i}.{family.block_attr}")))
    if not refs:
        raise ModelError(f"{type(model).__name__} has no MoE blocks; PERFT needs a Mixture-of-Experts model")
    return refs
