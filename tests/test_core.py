"""The PERFT core against plain loop-based references of method.md's equations, and on every MoE family."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from perft_cli.arch import find_moe_blocks
from perft_cli.perft import (
    PerftConfig,
    RoutingRecorder,
    adapter_state_dict,
    attach,
    attached_adapters,
    count_params,
    detach,
    load_adapter_state_dict,
    load_balancing_loss,
    topk_indices,
    topk_route,
)
from perft_cli.perft.experts import ExpertBank
from perft_cli.tiny import FAMILIES, tiny_model

# ---------------------------------------------------------------------------------------------------------------
# Loop-based references, written straight from method.md, one token and one expert at a time.


def ref_delta(h_t: torch.Tensor, A: torch.Tensor, B: torch.Tensor, form: str, scale: float) -> torch.Tensor:
    """One PEFT expert on one token: lora (alpha/r) B A h, or parallel W2 silu(W1 h). A: [D, r], B: [r, D]."""
    z = h_t @ A
    z = F.silu(z) if form == "parallel" else z * scale
    return z @ B


def ref_perft(block, adapter, h: torch.Tensor) -> torch.Tensor:
    """MoE(h) + the variant's sum, token by token (h: [T, D])."""
    cfg = adapter.config
    bank = adapter.experts
    A, B, scale = bank.perft_A, bank.perft_B, bank.scale
    _, base_w, base_i = adapter._router(h)  # the frozen router's own top-k (family scaling included)
    rows = []
    for t in range(h.shape[0]):
        h_t = h[t].float()
        acc = torch.zeros_like(h_t)
        if cfg.variant == "perft-r":
            p = torch.softmax(h_t @ adapter.perft_router.weight.T, dim=-1)
            w, idx = torch.topk(p, adapter.top_k)
            if cfg.renormalize:
                w = w / w.sum()
            for j in range(adapter.top_k):
                acc = acc + w[j] * ref_delta(h_t, A[idx[j]], B[idx[j]], bank.form, scale)
        elif cfg.variant == "perft-e":
            for j in range(base_i.shape[1]):
                e = int(base_i[t, j])
                acc = acc + base_w[t, j].float() * ref_delta(h_t, A[e], B[e], bank.form, scale)
        else:
            for j in range(bank.num_experts):
                acc = acc + ref_delta(h_t, A[j], B[j], bank.form, scale)
        rows.append(acc)
    return torch.stack(rows)


def _block_with_adapter(family: str, cfg: PerftConfig, seed: int = 0):
    model = tiny_model(family, seed=seed)
    ref = find_moe_blocks(model)[0]
    torch.manual_seed(seed + 1)
    (adapter,) = attach(ref.block, [ref], cfg)
    with torch.no_grad():
        adapter.experts.perft_B.normal_(0.0, 0.1)  # a visible adapter contribution
    return ref, adapter


def _call(block, h3):
    out = block(h3)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("form", ["lora", "parallel"])
@pytest.mark.parametrize(
    "variant,n,k,r,impl",
    [
        ("perft-r", 2, 1, 4, "auto"),
        ("perft-r", 4, 2, 8, "dense"),
        ("perft-r", 8, 2, 4, "grouped"),
        ("perft-r", 16, 4, 16, "grouped"),
        ("perft-r", 8, 2, 3, "grouped"),  # a rank grouped_mm cannot stride (12 bytes): padded for the call
        ("perft-r", 6, 6, 2, "dense"),
        ("perft-e", 0, 0, 4, "grouped"),
        ("perft-e", 0, 0, 6, "grouped"),
        ("perft-e", 0, 0, 8, "dense"),
        ("perft-d", 3, 0, 4, "auto"),
        ("perft-s", 1, 0, 8, "auto"),
    ],
)
def test_variant_matches_loop_reference(variant, n, k, r, impl, form):
    cfg = PerftConfig(
        variant=variant,
        expert_form=form,
        num_experts=max(n, 1),
        top_k=max(k, 1),
        rank=r,
        alpha=3 * r,
        dropout=0.0,
        impl=impl,
    )
    ref, adapter = _block_with_adapter("olmoe", cfg)
    torch.manual_seed(3)
    h = torch.randn(2, 7, ref.hidden_size, requires_grad=True)
    got = _call(ref.block, h)  # [2, 7, D]
    grads = torch.autograd.grad(got.pow(2).sum(), [h, *adapter.parameters()])

    h2 = h.detach().clone().requires_grad_(True)
    handles = adapter._handles
    for hd in handles:
        hd.remove()  # the plain frozen block, without the hook
    frozen = _call(ref.block, h2)
    want = frozen + ref_perft(ref.block, adapter, h2.reshape(-1, ref.hidden_size)).view_as(frozen)
    want_grads = torch.autograd.grad(want.pow(2).sum(), [h2, *adapter.parameters()])

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        # Float tolerance relative to the gradient's scale (with K = 1 the router gradient is exactly 0 in the
        # equation, and both sides hold rounding noise of the size of the other gradients).
        scale = max(1.0, max(x.abs().max().item() for x in want_grads))
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "gpt_oss", "mixtral"])
def test_perft_e_uses_the_family_router_weights(family):
    """PERFT-E reads the frozen router's weights as the family computes them (scaling, renormalisation)."""
    cfg = PerftConfig(variant="perft-e", rank=4, dropout=0.0)
    ref, adapter = _block_with_adapter(family, cfg)
    h = torch.randn(1, 5, ref.hidden_size)
    with torch.no_grad():
        got = _call(ref.block, h)
        for hd in adapter._handles:
            hd.remove()
        want = _call(ref.block, h) + ref_perft(ref.block, adapter, h.reshape(-1, ref.hidden_size)).view(1, 5, -1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_in,d_out", [(32, 4), (32, 6), (30, 8), (33, 12), (2, 3)])
def test_grouped_mm_takes_any_width(dtype, d_in, d_out):
    """grouped_mm refuses row strides that are not a multiple of 16 bytes (CPU and CUDA); the bank's wrapper pads.

    bf16 on the CPU runs the same stride rule the CUDA path meets (it computes in bf16): rank 4 or 12 there.
    """
    from perft_cli.perft.experts import _grouped_mm

    torch.manual_seed(0)
    sizes = [3, 0, 5, 2]  # an empty group too
    offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    x = torch.randn(sum(sizes), d_in, dtype=dtype, requires_grad=True)
    w = torch.randn(len(sizes), d_in, d_out, dtype=dtype, requires_grad=True)
    got = _grouped_mm(x, w, offs)
    assert got.shape == (sum(sizes), d_out) and got.dtype == dtype
    gy = torch.randn_like(got)
    gx, gw = torch.autograd.grad(got, [x, w], gy)
    x2, w2 = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    want = torch.cat([x2[s - n : s] @ w2[g] for g, (n, s) in enumerate(zip(sizes, offs.tolist(), strict=True))])
    wx, ww = torch.autograd.grad(want, [x2, w2], gy.float())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(gx.float(), wx, **tol)
    torch.testing.assert_close(gw.float(), ww, **tol)


def test_dense_and_grouped_paths_agree():
    torch.manual_seed(0)
    bank = ExpertBank(12, 64, 8, "lora")
    torch.nn.init.normal_(bank.perft_B, std=0.1)
    h = torch.randn(40, 64)
    idx = torch.stack([torch.randperm(12)[:3] for _ in range(40)])
    w = torch.rand(40, 3)
    bank.impl = "dense"
    dense = bank(h, idx, w)
    bank.impl = "grouped"
    torch.testing.assert_close(bank(h, idx, w), dense, rtol=1e-5, atol=1e-5)


def test_reference_init_statistics():
    bank = ExpertBank(4, 256, 16, "lora")
    assert math.isclose(bank.perft_A.std().item(), math.sqrt(2 / 16), rel_tol=0.05)
    assert bank.perft_B.abs().max().item() < 1e-5
    assert bank.perft_A.dtype == torch.float32
    zero = ExpertBank(4, 256, 16, "lora", init="zero")
    assert torch.count_nonzero(zero.perft_B) == 0


def test_scale_by_base_router_option():
    """The reference OLMoE quirk: PERFT-R experts scaled by the base router's weights in the same rank slot."""
    cfg = PerftConfig(variant="perft-r", num_experts=4, top_k=2, rank=4, dropout=0.0, scale_by_base_router=True)
    ref, adapter = _block_with_adapter("olmoe", cfg)
    h = torch.randn(6, ref.hidden_size)
    _, base_w, _ = ref.router(h)
    logits = adapter.perft_router(h)
    idx = torch.topk(torch.softmax(logits, -1), 2).indices
    want = sum(
        base_w[:, j : j + 1] * torch.stack([ref_delta(h[t], *_ab(adapter, idx[t, j]), "lora", 2.0) for t in range(6)])
        for j in range(2)
    )
    torch.testing.assert_close(adapter(h, base_w, None), want, rtol=1e-5, atol=1e-6)


def _ab(adapter, e):
    return adapter.experts.perft_A[e], adapter.experts.perft_B[e]


def test_load_balancing_loss_equals_transformers():
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    torch.manual_seed(0)
    logits = tuple(torch.randn(2 * 9, 6) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    for m in (None, mask):
        want = load_balancing_loss_func(logits, 6, 2, m)
        torch.testing.assert_close(load_balancing_loss(list(logits), 6, 2, m), want)
        recorded = [topk_route(lg, 2)[1] for lg in logits]  # what the routing recorder hands the training step
        torch.testing.assert_close(load_balancing_loss(list(logits), 6, 2, m, index=recorded), want)


# ---------------------------------------------------------------------------------------------------------------
# Every family: attach changes nothing at init, trains only perft_ parameters, and round-trips.

VARIANTS = ["perft-r", "perft-e", "perft-d", "perft-s"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_attach_train_roundtrip(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    x = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        frozen = model(x).logits
    for variant in VARIANTS:
        blocks = find_moe_blocks(model)
        # zero init: exactly the frozen function
        attach(model, blocks, PerftConfig(variant=variant, init="zero", num_experts=4, top_k=2, rank=4))
        with torch.no_grad():
            assert torch.equal(model(x).logits, frozen), (family, variant)
        detach(model)
        # reference init (B ~ N(0, 1e-6^2)): within the near-zero init. The tiny random models' residual stream is
        # small (embeddings ~ N(0, 0.02^2)) and the final norm rescales it, so 1e-6 weights move logits by ~1e-3.
        recorder = RoutingRecorder()
        adapters = attach(model, find_moe_blocks(model), PerftConfig(variant=variant, num_experts=4, rank=4), recorder)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, frozen, rtol=0, atol=1e-2)
        # gradients reach only perft_ parameters (the router included among the frozen)
        model.train()
        recorder.start()
        out = model(x, labels=x, output_router_logits=True)
        recorder.stop()
        loss = out.loss
        if variant == "perft-r":
            assert len(recorder.logits) == len(blocks)
            loss = loss + 0.01 * load_balancing_loss([lg for _, lg in recorder.logits], 4, 2)
        loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == ("perft_" in name), (family, variant, name)
            assert p.requires_grad == ("perft_" in name)
        model.eval()
        # save / load round trip reproduces the logits
        with torch.no_grad():
            for a in adapters:
                a.experts.perft_B.normal_(0.0, 0.05)
            adapted = model(x).logits
        assert not torch.allclose(adapted, frozen)
        state = adapter_state_dict(model)
        assert state and all("perft_" in k for k in state)
        model.zero_grad(set_to_none=True)
        detach(model)
        assert not attached_adapters(model)
        with torch.no_grad():
            assert torch.equal(model(x).logits, frozen)
        attach(model, find_moe_blocks(model), PerftConfig(variant=variant, num_experts=4, rank=4))
        load_adapter_state_dict(model, state)
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, adapted, rtol=0, atol=0)
        detach(model)


def test_stacked_parameters_all_receive_gradients():
    """Every expert's parameters get a gradient each step (DDP needs no find_unused_parameters)."""
    model = tiny_model("olmoe")
    attach(model, find_moe_blocks(model), PerftConfig(variant="perft-r", num_experts=8, top_k=1, rank=4))
    model.train()
    model(torch.randint(0, 256, (1, 3)), labels=torch.randint(0, 256, (1, 3))).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "perft_" in n]
    assert grads and all(g is not None for g in grads)


def test_count_params_formulas():
    model = tiny_model("olmoe")  # D = 64, E = 8, k = 2, 2 MoE layers
    D, r = 64, 4
    expect = {
        "perft-r": (2 * (4 * 2 * D * r + 4 * D), 2 * (2 * 2 * D * r + 4 * D)),
        "perft-e": (2 * 8 * 2 * D * r, 2 * 2 * 2 * D * r),
        "perft-d": (2 * 4 * 2 * D * r, 2 * 4 * 2 * D * r),
        "perft-s": (2 * 2 * D * r, 2 * 2 * D * r),
    }
    for variant, (trainable, activated) in expect.items():
        attach(model, find_moe_blocks(model), PerftConfig(variant=variant, num_experts=4, top_k=2, rank=r))
        c = count_params(model)
        assert (c["trainable"], c["activated"]) == (trainable, activated), variant
        assert c["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        detach(model)


def test_double_attach_is_refused():
    model = tiny_model("olmoe")
    attach(model, find_moe_blocks(model), PerftConfig())
    with pytest.raises(RuntimeError, match="already attached"):
        attach(model, find_moe_blocks(model), PerftConfig())


def test_float32_adapter_on_bf16_base():
    model = tiny_model("mixtral", dtype=torch.bfloat16)
    attach(model, find_moe_blocks(model), PerftConfig(variant="perft-r", num_experts=4, rank=4))
    adapter_params = [p for n, p in model.named_parameters() if "perft_" in n]
    assert adapter_params and all(p.dtype == torch.float32 for p in adapter_params)
    model.train()
    out = model(torch.randint(0, 256, (1, 6)), labels=torch.randint(0, 256, (1, 6)))
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_params)


def test_perft_r_routes_in_float32_under_bf16_autocast():
    """Training on a GPU runs under bf16 autocast; the PERFT-R router's logits must still be float32 (method.md)."""
    from perft_cli.perft.block import PerftAdapter

    torch.manual_seed(0)
    recorder = RoutingRecorder()
    adapter = PerftAdapter(PerftConfig(num_experts=8, top_k=2, rank=4), 64, 8, 2, recorder=recorder)
    h = torch.randn(32, 64, dtype=torch.bfloat16)
    recorder.start()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(h)
        assert torch.nn.functional.linear(h, adapter.perft_router.weight).dtype == torch.bfloat16  # autocast is on
    recorder.stop()
    (_, logits), (_, index) = recorder.logits[0], recorder.index[0]
    want = h.float() @ adapter.perft_router.weight.T  # [T, N] in float32, outside autocast
    assert logits.dtype == torch.float32 and out.shape == h.shape
    torch.testing.assert_close(logits, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(index, topk_indices(want, 2), rtol=0, atol=0)


def test_perft_e_does_not_recompute_the_router():
    """The frozen router runs once per block call with PERFT-E attached (its output is reused through a hook)."""
    model = tiny_model("olmoe")
    blocks = find_moe_blocks(model)
    calls = []
    for b in blocks:
        b.router.register_forward_hook(lambda m, i, o: calls.append(m))
    x = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        model(x)
        before = len(calls)
        attach(model, find_moe_blocks(model), PerftConfig(variant="perft-e", rank=4))
        model(x)
    assert before == len(blocks) and len(calls) == 2 * before


def test_dropout_is_active_in_training_only():
    model = tiny_model("olmoe")
    (adapter, *_) = attach(model, find_moe_blocks(model), PerftConfig(variant="perft-s", rank=4, dropout=0.5))
    with torch.no_grad():
        adapter.experts.perft_B.normal_(0, 0.1)
        h = torch.randn(3, 64)
        assert torch.equal(adapter(h), adapter(h))  # eval mode: deterministic
        adapter.train()
        assert not torch.equal(adapter(h), adapter(h))


@pytest.mark.parametrize("n,k", [(8, 1), (8, 2), (64, 2), (64, 4), (64, 8), (3, 3)])
def test_topk_indices_equal_torch_topk(n, k):
    scores = torch.randn(257, n, generator=torch.Generator().manual_seed(n * 10 + k))
    assert torch.equal(topk_indices(scores, k), torch.topk(scores, k, dim=-1).indices)


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_route_equals_softmax_then_topk(renormalize):
    """The fast form (top-K of the logits, softmax over the K chosen) equals the equation's softmax-then-top-K."""
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w, idx = topk_route(logits, 2, renormalize)
    p = F.softmax(logits, dim=-1)
    w_ref, idx_ref = torch.topk(p, 2, dim=-1)
    if renormalize:
        w_ref = w_ref / w_ref.sum(-1, keepdim=True)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref)
    g = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
    (grad,) = torch.autograd.grad((w * g).sum(), logits)
    (grad_ref,) = torch.autograd.grad((w_ref * g).sum(), logits)
    torch.testing.assert_close(grad, grad_ref)


def test_grouped_path_is_deterministic():
    """Same inputs, same bits: the grouped path (index_add_ on the CPU) forward and gradients, run twice."""
    torch.manual_seed(0)
    bank = ExpertBank(16, 32, 4, impl="grouped")
    with torch.no_grad():
        bank.perft_B.normal_(0.0, 0.1)
    h = torch.randn(300, 32)
    index = torch.randn(300, 16).topk(3, dim=-1).indices
    weights = torch.rand(300, 3)
    runs = []
    for _ in range(2):
        x = h.clone().requires_grad_(True)
        out = bank(x, index, weights)
        grads = torch.autograd.grad(out.pow(2).sum(), [x, bank.perft_A, bank.perft_B])
        runs.append((out, *grads))
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("form", ["lora", "parallel"])
def test_dropout_sits_where_method_md_puts_it(form):
    """lora: (alpha/r) B A dropout(h); parallel: W2 silu(dropout(W1 h)), with the same random stream as the bank."""
    torch.manual_seed(0)
    bank = ExpertBank(3, 16, 4, form=form, dropout=0.5, impl="dense").train()
    with torch.no_grad():
        bank.perft_B.normal_(0.0, 0.1)
    h = torch.randn(5, 16)
    torch.manual_seed(123)
    out = bank(h)  # perft-d: all 3 experts, weight 1
    A, B = bank.perft_A.detach(), bank.perft_B.detach()
    torch.manual_seed(123)
    if form == "lora":
        x = F.dropout(h, 0.5, training=True)  # one mask on the input [T, D]
        ref = sum(bank.scale * (x @ A[j]) @ B[j] for j in range(3))
    else:
        z = F.dropout(h @ A.permute(1, 0, 2).reshape(16, 12), 0.5, training=True).view(5, 3, 4)  # on W1 h
        ref = sum(F.silu(z[:, j]) @ B[j] for j in range(3))
    torch.testing.assert_close(out.detach(), ref)
