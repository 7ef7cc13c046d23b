"""perft's frozen experts path (perft_cli/perft/frozen_experts.py) against transformers' stock grouped_mm routine.

Same logits, same input gradients and same router gradients (the routing weights' backward) on every MoE model type
that routes its experts through transformers' experts interface, fp32 and bf16; activation checkpointing composes;
trainable expert weights (peft's LoRA on the fused experts) fall back to the stock routine; PERFT-E routes its bank
with the sort the frozen experts made, and gets the same numbers as with a sort of its own.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from perft_cli.arch import find_moe_blocks, is_experts
from perft_cli.perft import frozen_experts as fe
from perft_cli.perft.block import PerftConfig
from perft_cli.perft.inject import attach, detach
from perft_cli.tiny import FAMILIES, MATRIX, tiny_model

X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))  # [B, S]


def _interfaced(model) -> bool:
    return any(is_experts(m) and hasattr(m, "has_gate") for m in model.modules())


def _grads(model, path: str, checkpointing: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradients of every non-expert parameter (routers included) under one experts path."""
    fe.select_frozen_experts(model, path)
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        logits = model(input_ids=X).logits
        logits.float().square().mean().backward()
    finally:
        if checkpointing:
            model.activation_checkpointing_disable()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _frozen_experts_only(model) -> None:
    """Everything trains but the routed experts: gradients reach the routers through the routing weights."""
    experts = {id(p) for m in model.modules() if is_experts(m) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        p.requires_grad_(id(p) not in experts)


def _assert_same(
    model_type: str, dtype: torch.dtype, checkpointing: bool = False, rtol: float = 0.0, **overrides
) -> None:
    """Bit for bit where each token has at most 2 experts (two additions commute); with more, ``rtol``: the CPU's
    index_add_ adds a token's K rows in expert order, the stock K-way sum in slot order."""
    # eval mode: no dropout masks, no training-time router noise (PhiMoE's sparsemixer); gradients still flow
    model = tiny_model(model_type, dtype=dtype, **overrides).eval()
    if not _interfaced(model):
        pytest.skip(f"{model_type}'s experts bypass transformers' experts interface: the stock path is its only one")
    _frozen_experts_only(model)
    calls = []
    real = fe._FrozenExperts.apply
    logits_s, grads_s = _grads(model, "grouped_mm", checkpointing)
    try:
        fe._FrozenExperts.apply = lambda *a: calls.append(1) or real(*a)
        logits_p, grads_p = _grads(model, fe.IMPLEMENTATION, checkpointing)
    finally:
        fe._FrozenExperts.apply = real
    assert calls, "the perft path did not run"
    torch.testing.assert_close(logits_p, logits_s, rtol=rtol, atol=rtol * 1e-2)
    assert grads_s.keys() == grads_p.keys() and grads_s
    routers = [n for n in grads_s if "gate" in n or "router" in n]
    assert routers, "no router gradient to compare"
    for name in grads_s:
        scale = grads_s[name].abs().max().item()
        torch.testing.assert_close(grads_p[name], grads_s[name], rtol=max(rtol, 1e-6), atol=rtol * scale, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_same_numbers_as_the_stock_routine(model_type, dtype):
    _assert_same(model_type, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_same_numbers_with_top_8_of_16(dtype):
    """K > 2: the order of each token's K additions matters in bf16 (the stock path sums in float32, rounds once)."""
    _assert_same("olmoe", dtype, rtol=1e-5 if dtype == torch.float32 else 2e-2, num_experts=16, num_experts_per_tok=8)


@pytest.mark.parametrize("model_type", [t for t in MATRIX if t not in FAMILIES])
def test_same_numbers_as_the_stock_routine_on_every_model_type(model_type):
    _assert_same(model_type, torch.float32)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_activation_checkpointing_recomputes_the_same(model_type):
    _assert_same(model_type, torch.float32, checkpointing=True)


def test_load_model_selects_it_and_trainable_expert_weights_fall_back(tmp_path):
    from perft_cli.config import ModelConfig
    from perft_cli.modeling import load_model
    from perft_cli.tiny import save_tiny

    model, _ = load_model(ModelConfig(name_or_path=str(save_tiny(tmp_path / "m", "olmoe")), dtype="float32"))
    assert model.config._experts_implementation == fe.IMPLEMENTATION
    experts = next(m for m in model.modules() if is_experts(m))
    experts.gate_up_proj.requires_grad_(True)  # what peft's target_parameters LoRA makes of the fused weights
    calls = []
    real = fe._FrozenExperts.apply
    fe._FrozenExperts.apply = lambda *a: calls.append(1) or real(*a)
    try:
        model(input_ids=X).logits.sum().backward()
    finally:
        fe._FrozenExperts.apply = real
    assert experts.gate_up_proj.grad is not None  # the stock routine ran for that layer and trained its weight
    assert len(calls) == model.config.num_hidden_layers - 1


def test_perft_e_reuses_the_frozen_experts_sort_with_the_same_numbers(monkeypatch):
    model = tiny_model("olmoe").train()
    fe.select_frozen_experts(model)
    blocks = find_moe_blocks(model)
    adapters = attach(model, blocks, PerftConfig(variant="perft-e", rank=4, dropout=0.0, impl="grouped"))
    try:
        for a in adapters:
            a.experts.perft_B.data.normal_(0.0, 0.05)  # a trained-looking adapter: its output counts

        def run():
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=X).logits
            logits.square().mean().backward()
            return logits.detach(), [a.experts.perft_A.grad.clone() for a in adapters]

        sorts = []
        bank = importlib.import_module("perft_cli.perft.experts")  # the bank's own sort, when it makes one
        monkeypatch.setattr(bank, "make_dispatch", lambda *a, **k: sorts.append(1) or fe.make_dispatch(*a, **k))
        shared = run()
        assert not sorts, "the PERFT-E bank sorted the pairs again"
        assert all(a._dispatch is None for a in adapters)  # handed over and cleared within each block call
        for b in blocks:  # without the sink the bank sorts on its own
            object.__delattr__(b.experts, fe.DISPATCH_SINK)
        own = run()
        assert len(sorts) == len(blocks)  # one sort per PERFT-E bank of its own
    finally:
        detach(model)
    assert torch.equal(shared[0], own[0])
    for g_shared, g_own in zip(shared[1], own[1], strict=True):
        assert torch.equal(g_shared, g_own)
    assert all(not hasattr(b.experts, fe.DISPATCH_SINK) for b in blocks)
