"""PERFT adapters on the 4-bit backbone: they train, and their gradients match a dequantized-bf16 reference."""

from __future__ import annotations

import pytest
import torch

from perft_cli.arch import find_moe_blocks
from perft_cli.perft import PerftConfig, attach
from perft_cli.quant import audit, quantize_experts_
from perft_cli.quant.nf4 import dequantize_nf4, is_nf4
from perft_cli.tiny import tiny_model


def _nf4_and_reference(family: str):
    """A tiny model with NF4 experts, and a bf16 copy holding exactly the dequantized expert weights."""
    q = quantize_experts_(tiny_model(family, dtype=torch.bfloat16))
    ref = tiny_model(family, dtype=torch.bfloat16)
    with torch.no_grad():
        for (_, p), (_, rp) in zip(q.named_parameters(), ref.named_parameters(), strict=True):
            rp.copy_(dequantize_nf4(p).to(rp.dtype) if is_nf4(p) else p)
    return q, ref


@pytest.mark.parametrize("variant", ["perft-r", "perft-e"])
def test_adapter_gradients_on_nf4_match_dequantized_reference(variant):
    q, ref = _nf4_and_reference("olmoe")
    assert audit(q, quantization="nf4")["routed_experts"]["bytes_per_param"] <= 0.6
    cfg = PerftConfig(variant=variant, num_experts=4, top_k=2, rank=4, dropout=0.0)
    torch.manual_seed(0)
    attach(q, find_moe_blocks(q), cfg)
    state = {n: p.detach().clone() for n, p in q.named_parameters() if "perft_" in n}
    attach(ref, find_moe_blocks(ref), cfg)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "perft_" in n:
                p.copy_(state[n])
    q.train()
    ref.train()
    ids = torch.randint(0, 256, (2, 12))
    grads = []
    for m in (q, ref):
        m(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.float() for n, p in m.named_parameters() if "perft_" in n})
    for n, g in grads[1].items():
        rel = (grads[0][n] - g).norm() / g.norm().clamp_min(1e-12)
        assert rel < 1e-2, (n, rel.item())


def test_perft_r_trains_on_nf4_base_and_loss_falls():
    torch.manual_seed(0)
    model = quantize_experts_(tiny_model("mixtral", dtype=torch.bfloat16))
    attach(model, find_moe_blocks(model), PerftConfig(variant="perft-r", num_experts=4, top_k=2, rank=8, dropout=0.0))
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all("perft_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 256, (4, 16))  # one fixed batch: the adapter must fit it
    model.train()
    losses = []
    for _ in range(25):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert audit(model, quantization="nf4")["routed_experts"]["dtypes"] == ["nf4"]  # still 4-bit after training
