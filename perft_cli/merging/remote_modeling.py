"""PERFT adapters on a Mixture-of-Experts causal LM, for ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` on a folder written by ``perft merge``. Needs torch and transformers only.

This file is perft's own source (perft_cli/merging/remote_modeling.py), copied verbatim into every PERFT export as
``modeling_perft.py``. It builds the base family's model from ``config.text_config`` (its own classes, its own
weight names) and adds the trained PERFT adapter beside every MoE block that ``config.perft["blocks"]`` names
(perft's own block discovery wrote that list). Every variant reads the block input h and adds to the block output
(PERFT, arXiv 2411.08212):

- perft-r: MoE(h) + sum_{j in TopK(softmax(W~ h))} w_j Delta_j(h)   (own router W~ [N, D], N experts, top-K)
- perft-e: MoE(h) + sum_{i in TopK(G(h))} g_i(h) Delta_i(h)         (the frozen router's own top-k weights, N = E)
- perft-d: MoE(h) + sum_{j=1..N} Delta_j(h)                         (always on, weight 1; perft-s: N = 1)

with one PEFT expert ``Delta(h) = scale * B A h`` (form ``lora``, scale = alpha / r) or ``W2 silu(W1 h)``
(form ``parallel``). Dimensions: T tokens, D hidden size, N PEFT experts, K chosen, r rank. The adapters keep
float32 weights and compute in float32 whatever the base dtype (as in training); routing runs in float32 too,
since bf16 logits lose the small differences that decide the top-K.

Weights: the base's own parameter names (``model.layers.0.mlp.experts.gate_up_proj``, ...) in model-base.safetensors,
the adapters in adapter.safetensors as ``model.layers.<i>.<block>.perft_adapter.experts.perft_A [N, D, r]``,
``...perft_B [N, r, D]`` and (perft-r) ``...perft_adapter.perft_router.weight [N, D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel

VARIANTS = ("perft-r", "perft-e", "perft-d", "perft-s")


class PerftMoeConfig(PretrainedConfig):
    """The base model's config as ``text_config`` and the adapter's shape as ``perft`` (a plain dict)."""

    model_type = "perft_moe"

    def __init__(self, text_config: dict | PretrainedConfig | None = None, perft: dict | None = None, **kwargs):
        if isinstance(text_config, dict):
            fields = {k: v for k, v in text_config.items() if k != "model_type"}
            text_config = AutoConfig.for_model(text_config["model_type"], **fields)
        self.text_config = text_config
        # variant, expert_form, top_k (K), scale, renormalize, scale_by_base_router, and "blocks": one entry per
        # adapted MoE block, {"block": module name, "router": module name, "experts": N, "hidden_size": D, "rank": r}
        self.perft = dict(perft or {})
        if text_config is not None:
            kwargs.setdefault("tie_word_embeddings", getattr(text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if isinstance(self.text_config, PretrainedConfig):
            out["text_config"] = self.text_config.to_dict()
        return out


class PerftExperts(nn.Module):
    """N PEFT experts of rank r on hidden size D, stacked: perft_A [N, D, r], perft_B [N, r, D]."""

    def __init__(self, num_experts: int, hidden_size: int, rank: int, form: str, scale: float):
        super().__init__()
        self.form, self.scale = form, scale
        self.perft_A = nn.Parameter(torch.zeros(num_experts, hidden_size, rank, dtype=torch.float32))
        self.perft_B = nn.Parameter(torch.zeros(num_experts, rank, hidden_size, dtype=torch.float32))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, D] float32; gate [T, N] each expert's weight per token (0 = not chosen), None = all with weight 1."""
        T, (N, D, r) = x.shape[0], self.perft_A.shape
        z = x @ self.perft_A.permute(1, 0, 2).reshape(D, N * r)  # [T, N*r] every expert's bottleneck at once
        z = F.silu(z) if self.form == "parallel" else z * self.scale  # [T, N*r]
        if gate is not None:
            z = (z.view(T, N, r) * gate[:, :, None]).reshape(T, N * r)  # [T, N*r] unchosen experts give 0
        return z @ self.perft_B.reshape(N * r, D)  # [T, D] sum over experts of weight * Delta_j(x)


class PerftAdapter(nn.Module):
    """What runs beside one MoE block: the PEFT experts and, for perft-r, the new router."""

    def __init__(self, perft: dict, block: dict):
        super().__init__()
        self.variant = perft["variant"]
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown PERFT variant {self.variant!r}; expected one of {VARIANTS}")
        n, d = int(block["experts"]), int(block["hidden_size"])  # perft-e: N = the base's E; perft-s: N = 1
        self.top_k, self.renormalize = int(perft.get("top_k", n)), bool(perft.get("renormalize", True))
        self.scale_by_base_router = bool(perft.get("scale_by_base_router", False))
        self.experts = PerftExperts(n, d, int(block["rank"]), perft["expert_form"], float(perft["scale"]))
        if self.variant == "perft-r":
            self.perft_router = nn.Linear(d, n, bias=False, dtype=torch.float32)
        self.base_routing: tuple[torch.Tensor, torch.Tensor] | None = None  # set by the router hook, used once

    @property
    def needs_base_routing(self) -> bool:
        return self.variant == "perft-e" or self.scale_by_base_router

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] the block input -> [..., D] float32, the sum of the chosen experts' outputs."""
        x = h.reshape(-1, h.shape[-1]).float()  # [T, D]
        routing, self.base_routing = self.base_routing, None
        if self.needs_base_routing and routing is None:
            raise RuntimeError("the frozen router did not run inside its MoE block")
        gate = None  # perft-d / perft-s: every expert, weight 1
        if self.variant == "perft-e":
            base_weights, base_index = routing  # [T, k], [T, k]
            gate = x.new_zeros(x.shape[0], self.experts.perft_A.shape[0]).scatter(1, base_index, base_weights.float())
        elif self.variant == "perft-r":
            with torch.autocast(x.device.type, enabled=False):
                logits = self.perft_router(x)  # [T, N] float32
            index = torch.topk(logits, self.top_k, dim=-1).indices  # [T, K]; softmax keeps the order
            if self.renormalize:  # p_i / sum_{TopK} p_j is a softmax over the K chosen logits
                weights = F.softmax(logits.gather(1, index), dim=-1)  # [T, K]
            else:
                weights = F.softmax(logits, dim=-1).gather(1, index)  # [T, K]
            if self.scale_by_base_router:  # the reference OLMoE code: slot j scaled by the base router's slot j
                weights = routing[0][:, : self.top_k].float()  # [T, K]
            gate = torch.zeros_like(logits).scatter(1, index, weights)  # [T, N]
        return self.experts(x, gate).view(h.shape)


def _router_hook(router: nn.Module, args: tuple, output: tuple) -> None:
    # (logits [T, E], topk_weights [T, k], topk_index [T, k]): handed to the block hook of the same block call.
    if len(output) == 2 and output[0].shape == output[1].shape:
        # Llama4: (scores [T, E], logits [T, E]), scores nonzero at the router's own top-k of the logits.
        index = torch.topk(output[1], router.top_k, dim=1).indices  # [T, k]
        router.perft_owner.base_routing = (output[0].gather(1, index), index)  # [T, k], [T, k]
        return
    router.perft_owner.base_routing = (output[1], output[2])


def _block_hook(block: nn.Module, args: tuple, kwargs: dict, output):
    h = args[0] if args else kwargs["hidden_states"]  # [B, S, D] or [T, D] the FFN sub-layer input
    hidden = output[0] if isinstance(output, tuple) else output  # gpt-oss returns (hidden, router scores)
    delta = block.perft_adapter(h).to(hidden.dtype).view(hidden.shape)
    return (hidden + delta, *output[1:]) if isinstance(output, tuple) else hidden + delta


class PerftMoeForCausalLM(PreTrainedModel, GenerationMixin):
    """The base family's causal LM (its modules under their own names) with a PERFT adapter on every MoE block."""

    config_class = PerftMoeConfig
    base_model_prefix = "model"
    _keep_in_fp32_modules_strict = ["perft_adapter"]  # adapters stay float32 on a bf16 / fp16 base
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: PerftMoeConfig):
        super().__init__(config)
        # The dtype from_pretrained is building in (its dtype= argument, or the config's), not text_config's own.
        base = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.get_default_dtype())
        for name, child in base.named_children():  # model, lm_head: the weight names of the base checkpoint
            self.add_module(name, child)
        object.__setattr__(self, "_base", base)  # runs forward and generate; not a submodule (no second prefix)
        self._tied_weights_keys = getattr(base, "_tied_weights_keys", None)
        self._no_split_modules = getattr(base, "_no_split_modules", None)  # device_map="auto": whole decoder layers
        # The MoE blocks perft adapted, by module name (perft found them when it trained; dense layers have none).
        for spec in config.perft.get("blocks", []):
            block = self.get_submodule(spec["block"])
            block.perft_adapter = PerftAdapter(config.perft, spec)
            block.register_forward_hook(_block_hook, with_kwargs=True)
            if block.perft_adapter.needs_base_routing:
                router = self.get_submodule(spec["router"])
                object.__setattr__(router, "perft_owner", block.perft_adapter)  # a reference, not a submodule
                router.register_forward_hook(_router_hook)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, PerftExperts):  # weights missing from the checkpoint: an adapter that adds nothing
            with torch.no_grad():
                module.perft_A.zero_()
                module.perft_B.zero_()
        elif not isinstance(module, PerftAdapter):
            self._base._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self._base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self._base.get_output_embeddings()

    def forward(self, *args, **kwargs):
        return self._base(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self._base.generation_config = self.generation_config  # the folder's generation_config.json
        return self._base.generate(*args, **kwargs)
