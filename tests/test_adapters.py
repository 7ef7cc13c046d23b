"""adapters.py: attaching PERFT or LoRA as a recipe asks, and refusing what a family cannot do."""

from __future__ import annotations

import pytest
import torch

from perft_cli.adapters import attach_adapter, detach_adapter
from perft_cli.arch import family_for
from perft_cli.config import AdapterConfig
from perft_cli.errors import RecipeError
from perft_cli.tiny import tiny_model


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_scale_by_base_router_is_refused_where_the_top_k_comes_back_unsorted(family):
    model = tiny_model(family)
    cfg = AdapterConfig(variant="perft-r", num_experts=2, top_k=1, rank=2, scale_by_base_router=True)
    with pytest.raises(RecipeError, match=r"returns its top-k unsorted \(torch.topk sorted=False\).*: false"):
        attach_adapter(model, cfg, family_for(model.config.model_type))
    attach_adapter(model, cfg.model_copy(update={"scale_by_base_router": False}), family_for(family))  # the equation


def test_scale_by_base_router_still_attaches_where_the_top_k_is_sorted():
    model = tiny_model("olmoe")
    cfg = AdapterConfig(variant="perft-r", num_experts=2, top_k=1, rank=2, scale_by_base_router=True)
    attached = attach_adapter(model, cfg, family_for("olmoe"))
    assert attached.moe_layers > 0


@pytest.mark.parametrize("variant", ["perft-r", "perft-e", "lora"])
def test_detach_gives_the_base_its_requires_grad_back(variant):
    model = tiny_model("olmoe")
    for name, p in model.named_parameters():  # a user's own choice: embeddings trainable, the rest frozen
        p.requires_grad_("embed_tokens" in name)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    attached = attach_adapter(
        model, AdapterConfig(variant=variant, num_experts=2, top_k=1, rank=2), family_for("olmoe")
    )
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embed_tokens" in n)  # frozen to train
    detach_adapter(model, attached.variant)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
