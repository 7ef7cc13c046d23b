"""Every supported MoE model type, the export and the routing report (slow: tests/test_families.py has the rest of
the matrix in the inner loop): the shipped modeling file gives the adapted model's logits, a routing pass counts
every token. A file of its own so that the two test workers share the matrix.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_INPUT as X

from perft_cli.arch import family_for
from perft_cli.tiny import MATRIX

N, K, R = 4, 2, 4  # PERFT-R experts, top-K, rank


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


@pytest.mark.slow  # ~25 s over 59 types; the inner loop keeps one isolated export and the routing tests
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
