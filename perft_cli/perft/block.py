"""The PERFT adapter of one frozen MoE block, one module for all variants.

Every variant reads the FFN sub-layer input h and adds to the block's output (method.md):
- perft-r: MoE(h) + sum_{j in TopK(softmax(W~ h))} w_j Delta_j(h)      (own router, N experts, top-K)
- perft-e: MoE(h) + sum_{i in TopK(G(h))} g_i(h) Delta_i(h)            (frozen router's own top-k weights, N = E)
- perft-d: MoE(h) + sum_{j=1..N} Delta_j(h)                            (always active, weight 1)
- perft-s: MoE(h) + Delta(h)                                           (perft-d with N = 1)

The adapter sits on the block as ``block.perft_adapter`` and runs from a forward hook, so the block, its router and
its experts keep their names and code. PERFT-E reads the frozen router's ``(logits, topk_weights, topk_index)``
through a forward hook on the router during the same block call: nothing is recomputed, and whatever normalisation
and scaling the family applies (OLMoE's unnormalised top-k, DeepSeek's routed_scaling_factor) comes with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from perft_cli.perft.experts import ExpertBank
from perft_cli.perft.routing import topk_route

VARIANTS = ("perft-r", "perft-e", "perft-d", "perft-s")


@dataclass(frozen=True)
class PerftConfig:
    """What to attach. N and K are ignored where the variant fixes them (perft-e: N = E, K = k; perft-s: N = 1)."""

    variant: str = "perft-r"
    expert_form: str = "lora"
    num_experts: int = 4
    top_k: int = 2
    rank: int = 16
    alpha: float | None = None  # None: 2 * rank (reference scripts)
    dropout: float = 0.05
    init: str = "reference"  # or "zero": up projections start at exactly 0
    renormalize: bool = True  # perft-r: renormalise the top-K weights to sum to 1 (the paper's equation)
    scale_by_base_router: bool = False  # perft-r: the reference OLMoE code's quirk (method.md), off by default
    impl: str = "auto"  # auto | dense | grouped (experts.py)


@dataclass
class RoutingRecorder:
    """Explicit collector of routing during a forward pass (nothing is kept on the modules).

    While ``active``, every PERFT-R adapter appends its router logits [T, N] (with their graph, for the aux loss)
    and its chosen experts [T, K] (detached, for load statistics), tagged with its layer index.
    """

    active: bool = False
    logits: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    index: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def start(self) -> RoutingRecorder:
        self.logits.clear()
        self.index.clear()
        self.active = True
        return self

    def stop(self) -> None:
        # Also keeps activation checkpointing's recomputation in backward from appending a second copy.
        self.active = False


class PerftAdapter(nn.Module):
    """The trainable part added beside one MoE block: a bank of PEFT experts and, for perft-r, a router."""

    def __init__(
        self,
        config: PerftConfig,
        hidden_size: int,
        base_num_experts: int,
        base_top_k: int,
        layer: int = 0,
        recorder: RoutingRecorder | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if config.variant not in VARIANTS:
            raise ValueError(f"unknown PERFT variant {config.variant!r}; expected one of {VARIANTS}")
        self.config, self.layer, self.recorder = config, layer, recorder
        self.base_top_k = base_top_k
        n = {"perft-e": base_num_experts, "perft-s": 1}.get(config.variant, config.num_experts)
        self.top_k = {"perft-e": base_top_k, "perft-r": config.top_k}.get(config.variant, n)
        if config.variant == "perft-r" and not 1 <= self.top_k <= n:
            raise ValueError(f"perft-r top_k={self.top_k} must be between 1 and num_experts={n}")
        if config.scale_by_base_router and self.top_k > base_top_k:
            raise ValueError(f"scale_by_base_router needs top_k <= the base top-k ({base_top_k}), got {self.top_k}")
        self.experts = ExpertBank(
            n,
            hidden_size,
            config.rank,
            config.expert_form,
            config.alpha,
            config.dropout,
            config.init,
            config.impl,
            device=device,
        )
        if config.variant == "perft-r":
            self.perft_router = nn.Linear(hidden_size, n, bias=False, device=device, dtype=torch.float32)
            if not self.perft_router.weight.is_meta:
                nn.init.normal_(self.perft_router.weight, 0.0, 0.02)  # method.md: new router ~ N(0, 0.02^2)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def needs_base_routing(self) -> bool:
        return self.config.variant == "perft-e" or self.config.scale_by_base_router

    def forward(
        self,
        h: torch.Tensor,
        base_weights: torch.Tensor | None = None,
        base_index: torch.Tensor | None = None,
        dispatch=None,
    ) -> torch.Tensor:
        """h: [..., D] block input; base_weights / base_index: [T, k] the frozen router's top-k; ``dispatch``: the
        frozen experts' sort of those pairs (frozen_experts.Dispatch), reused by PERFT-E. Returns [..., D]."""
        shape = h.shape
        x = h.reshape(-1, shape[-1])  # [T, D]
        variant = self.config.variant
        if variant == "perft-e":
            delta = self.experts(x, base_index, base_weights, dispatch)
        elif variant == "perft-r":
            # method.md routes in float32; under a bf16 autocast (training on GPU) the Linear would run in bf16
            # and round away the small logit differences that decide the top-K. [T, D] x [D, N]: cheap in fp32.
            with torch.autocast(x.device.type, enabled=False):
                logits = self.perft_router(x.float())  # [T, N] float32
            weights, index = topk_route(logits, self.top_k, self.config.renormalize)  # [T, K], [T, K]
            if self.config.scale_by_base_router:
                # Reference OLMoE code: the j-th chosen adapter expert is scaled by the base router's j-th weight.
                weights = base_weights[:, : self.top_k].to(weights.dtype)
            if self.recorder is not None and self.recorder.active:
                self.recorder.logits.append((self.layer, logits))
                self.recorder.index.append((self.layer, index.detach()))
            delta = self.experts(x, index, weights)
        else:  # perft-d, perft-s: every expert, weight 1
            delta = self.experts(x)
        return delta.view(shape)

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def activated_params(self) -> int:
        """Parameters one token touches (method.md, parameter accounting), the router included."""
        per_expert = self.experts.perft_A[0].numel() + self.experts.perft_B[0].numel()  # 2 D r
        router = self.perft_router.weight.numel() if self.config.variant == "perft-r" else 0  # N D
        return self.top_k * per_expert + router

    def extra_repr(self) -> str:
        return f"variant={self.config.variant}, layer={self.layer}, K={self.top_k}"
