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


def _adapted(model, cfg):
    """Attach ``cfg`` with an adapter that changes the output; returns (attached, logits, state dict)."""
    from perft_cli.adapters import adapter_state, attach_adapter

    torch.manual_seed(1)
    attached = attach_adapter(model, cfg, family_for(model.config.model_type))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "perft_B" in name:
                p.normal_(0.0, 0.05)
        logits = model(X).logits
    return attached, logits, adapter_state(model, cfg.variant)


def _release(model, variant):
    from perft_cli.adapters import detach_adapter

    detach_adapter(model, variant)
    for p in model.parameters():
        p.requires_grad_(True)


@pytest.mark.parametrize("model_type", MATRIX)
def test_the_export_and_the_routing_report_work_on_every_type(_tiny, model_type):
    """The shipped modeling file (remote_modeling, built in-process here; tests/test_merging_export.py loads real
    exports in a perft-free child) gives the adapted model's logits for PERFT-R and PERFT-E (the family's own top-k),
    and a routing pass counts every real token's top-k on every MoE layer."""
    from perft_cli.config import AdapterConfig
    from perft_cli.merging import export, remote_modeling
    from perft_cli.routing_report.counting import layer_report, routing_pass

    model, _ = _tiny(model_type)
    for variant in ("perft-r", "perft-e"):
        cfg = AdapterConfig(variant=variant, num_experts=N, top_k=K, rank=R, dropout=0.0)
        attached, adapted, state = _adapted(model, cfg)
        try:
            spec = export.perft_spec(cfg, export.adapted_blocks(model, state))
            if variant == "perft-r":
                with torch.no_grad():
                    n = {b.layer: N for b in attached.blocks}
                    counts = routing_pass(model, attached.blocks, [(X, torch.ones_like(X))], attached.recorder, n)
                for b in attached.blocks:  # every real token to top-k base experts and to K PERFT experts
                    rep = layer_report(b.layer, b.name, b.top_k, counts, counts, K)
                    assert rep["tokens"] == X.numel() and sum(rep["perft"]["counts"]) == X.numel() * K, b.name
        finally:
            _release(model, variant)
        config = remote_modeling.PerftMoeConfig(text_config=model.config.to_dict(), perft=spec)
        shipped = remote_modeling.PerftMoeForCausalLM(config).eval()
        missing, unexpected = shipped.load_state_dict({**model.state_dict(), **state}, strict=False)
        assert not unexpected and not [m for m in missing if "perft_" in m], (missing, unexpected)
        with torch.no_grad():
            got = shipped(X).logits
        assert torch.allclose(got, adapted, rtol=1e-4, atol=1e-5), (variant, (got - adapted).abs().max())
