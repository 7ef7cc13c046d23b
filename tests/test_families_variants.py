"""Every supported MoE model type, the rest of the matrix (tests/test_families.py has the structural checks): the
other variants and expert forms start at the frozen function, the LoRA baseline finds its targets, and a few steps
of PERFT-R lower the loss. A file of its own so that the two test workers share the matrix.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_INPUT as X

from perft_cli.arch import family_for, find_moe_blocks
from perft_cli.perft.block import PerftConfig
from perft_cli.perft.inject import attach, detach
from perft_cli.tiny import MATRIX

N, K, R = 4, 2, 4  # PERFT-R experts, top-K, rank


@pytest.mark.parametrize("model_type", MATRIX)
def test_every_variant_form_and_the_lora_baseline_attach_and_a_few_steps_learn(_tiny, model_type):
    """PERFT-D (parallel form) and PERFT-S (lora form) start at the frozen function too, the LoRA baseline finds its
    attention targets, and five optimizer steps of PERFT-R lower the loss on a fixed batch."""
    from perft_cli.adapters import attach_adapter, detach_adapter
    from perft_cli.config import AdapterConfig

    model, frozen = _tiny(model_type)
    blocks = find_moe_blocks(model)
    for variant, form in (("perft-d", "parallel"), ("perft-s", "lora")):
        cfg = PerftConfig(variant=variant, expert_form=form, num_experts=2, rank=R, init="zero", dropout=0.0)
        attach(model, blocks, cfg)
        try:
            with torch.no_grad():
                assert torch.equal(model(X).logits, frozen), (variant, form)
        finally:
            detach(model)
    family = family_for(model.config.model_type)
    lora = attach_adapter(model, AdapterConfig(variant="lora", rank=2), family)
    try:
        assert any("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    finally:
        detach_adapter(model, lora.variant)
    torch.manual_seed(0)
    attach(model, blocks, PerftConfig(variant="perft-r", num_experts=N, top_k=K, rank=R, dropout=0.0))
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-2)
        losses = []
        for _ in range(6):
            loss = model(X, labels=X).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses
    finally:
        detach(model)
        for p in model.parameters():
            p.requires_grad_(True)
