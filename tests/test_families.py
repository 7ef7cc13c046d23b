"""Every MoE model type perft supports, on a tiny random model built from its config: one parametrised matrix.

For each: zero-init PERFT-R and PERFT-E leave the logits unchanged, only ``perft_`` parameters get gradients, PERFT-E
reads exactly the top-k weights and index the family's own experts receive, ``perft plan`` gives method.md's counts,
and NF4 experts hold at most 0.6 bytes per weight. Each model is built once per module (``_tiny``).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import FAMILY_INPUT as X
from typer.testing import CliRunner

from perft_cli.arch import FAMILIES, REFUSED, decoder_layers, family_for, find_moe_blocks, is_experts
from perft_cli.cli import app
from perft_cli.errors import ModelError
from perft_cli.perft.block import PerftConfig
from perft_cli.perft.inject import attach, detach
from perft_cli.tiny import MATRIX, tiny_config

N, K, R = 4, 2, 4  # PERFT-R experts, top-K, rank


def test_matrix_covers_the_first_seven_families():
    assert set(FAMILIES) <= set(MATRIX)


@pytest.mark.parametrize(
    "model_type", [t for t in ("jamba", "nemotron_h", "granitemoehybrid", "qwen3_next") if t in MATRIX]
)
def test_hybrids_adapt_their_moe_layers_only(_tiny, model_type):
    model, _ = _tiny(model_type)
    blocks = find_moe_blocks(model)
    moe_layers = [i for i, layer in enumerate(decoder_layers(model)) if any(is_experts(m) for m in layer.modules())]
    assert [b.layer for b in blocks] == moe_layers
    if model_type in ("jamba", "nemotron_h"):  # their tiny models hold a Mamba layer with a dense FFN or none
        assert len(blocks) < len(decoder_layers(model))


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refusals_are_the_one_line_of_the_table(tmp_path, model_type):
    with pytest.raises(ModelError) as e:
        family_for(model_type)
    assert str(e.value) == REFUSED[model_type] and "\n" not in str(e.value)


def test_unknown_and_non_moe_types_are_refused_in_one_line():
    for model_type, why in (("llama", "not a supported MoE family"), ("qwen3_vl_moe", "no causal-LM class")):
        with pytest.raises(ModelError, match=why):
            family_for(model_type)


@pytest.mark.parametrize("model_type", MATRIX)
def test_zero_init_changes_nothing_and_only_perft_trains(_tiny, model_type):
    model, frozen = _tiny(model_type)
    blocks = find_moe_blocks(model)
    assert 0 < len(blocks) <= len(decoder_layers(model))
    for variant in ("perft-r", "perft-e"):
        attach(model, blocks, PerftConfig(variant=variant, num_experts=N, top_k=K, rank=R, init="zero", dropout=0.0))
        try:
            with torch.no_grad():
                assert torch.equal(model(X).logits, frozen), variant
        finally:
            detach(model)
    attach(model, blocks, PerftConfig(variant="perft-r", num_experts=N, top_k=K, rank=R, dropout=0.0))
    try:
        model(X, labels=X).loss.backward()
        grads = {n: p.grad is not None for n, p in model.named_parameters()}
        assert all(has == ("perft_" in n) for n, has in grads.items()), [n for n, g in grads.items() if g]
        assert any(grads.values())
    finally:
        detach(model)
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)


def _interfaced(experts) -> bool:
    return hasattr(experts, "has_gate")  # set by transformers' @use_experts_implementation


@pytest.mark.parametrize("model_type", MATRIX)
def test_perft_e_reads_the_weights_the_experts_receive(_tiny, model_type):
    """The top-k weights / index PERFT-E is given are the ones the family's experts are called with.

    Outside the experts interface (Llama4) the block scales each chosen expert by the router's dense scores [T, E]
    instead: PERFT-E's (weights, index) scattered back must give exactly those scores.
    """
    model, _ = _tiny(model_type)
    blocks = find_moe_blocks(model)
    adapters = attach(model, blocks, PerftConfig(variant="perft-e", rank=R, dropout=0.0))
    seen: dict[int, list] = {b.layer: [] for b in blocks}
    hooks = []
    for b, a in zip(blocks, adapters, strict=True):
        i = b.layer
        if _interfaced(b.experts):  # experts(hidden [T, D], top_k_index [T, k], top_k_weights [T, k])
            hooks.append(b.experts.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[1:3])))
        else:  # router -> (scores [T, E], logits [T, E])
            hooks.append(b.router.register_forward_hook(lambda m, args, out, i=i: seen[i].append(out[0])))
        # adapter(h, base_weights, base_index)
        hooks.append(a.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[2:0:-1])))
    try:
        with torch.no_grad():
            model(X)
    finally:
        for h in hooks:
            h.remove()
        detach(model)
    for b in blocks:
        calls = seen[b.layer]
        assert len(calls) == 2, (b.layer, len(calls))
        family, (idx_a, w_a) = calls
        assert w_a.shape == idx_a.shape and w_a.shape[-1] == b.top_k
        if _interfaced(b.experts):
            idx_e, w_e = family
            assert torch.equal(idx_e, idx_a) and torch.equal(w_e, w_a), b.layer
        else:
            assert torch.equal(torch.zeros_like(family).scatter(1, idx_a, w_a), family), b.layer


def _plan(tmp_path, config, *overrides) -> dict:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    config.save_pretrained(d)  # config.json only: perft plan builds the model on the meta device
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {d}, quantization: nf4}}\n")
    args = ["plan", str(recipe), "--json"] + [x for o in overrides for x in ("--set", o)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("model_type", MATRIX)
def test_plan_counts_are_method_md_formulas(_tiny, tmp_path, model_type):
    model, _ = _tiny(model_type)
    blocks = find_moe_blocks(model)
    layers, d, e, k = len(blocks), model.config.get_text_config().hidden_size, blocks[0].num_experts, blocks[0].top_k
    config = tiny_config(model_type)
    r_plan = _plan(tmp_path, config, f"adapter.num_experts={N}", f"adapter.top_k={K}", f"adapter.rank={R}")
    assert r_plan["variant"] == "perft-r"
    assert r_plan["trainable_params"] == layers * (N * 2 * d * R + N * d)
    assert r_plan["activated_params"] == layers * (K * 2 * d * R + N * d)
    e_plan = _plan(tmp_path, config, "adapter.variant=perft-e", f"adapter.rank={R}")
    assert (e_plan["trainable_params"], e_plan["activated_params"]) == (layers * e * 2 * d * R, layers * k * 2 * d * R)
    assert r_plan["moe_layers"] == layers and r_plan["base_num_experts"] == e
    # The LoRA baseline: r (in + out) for every attention projection the family names that the model has.
    targets = family_for(model_type).lora_targets
    if any("." in t for t in targets):
        return  # adapters._lora_targets checks a module's last name only, so Inkling2's dotted targets fail there
    linears = [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.rpartition(".")[2] in targets
    ]
    lora = _plan(tmp_path, config, "adapter.variant=lora", f"adapter.rank={R}")
    assert linears and lora["trainable_params"] == sum(R * (m.in_features + m.out_features) for m in linears)


@pytest.mark.parametrize("model_type", MATRIX)
def test_nf4_experts_are_4_bit(_tiny, model_type):
    from perft_cli.quant.experts import EXPERT_WEIGHTS, quantize_experts_
    from perft_cli.quant.nf4 import is_nf4, logical_numel, packed_bytes

    model, _ = _tiny(model_type)
    if not all(_interfaced(b.experts) for b in find_moe_blocks(model)):
        pytest.skip("the NF4 experts path needs transformers' experts interface; these experts stay unquantized")
    # fp32 compute: some families keep their router in fp32 (_keep_in_fp32_modules), which a blanket .to(bf16) breaks
    q = quantize_experts_(copy.deepcopy(model), compute_dtype=torch.float32)
    weights = [getattr(b.experts, n) for b in find_moe_blocks(q) for n in EXPERT_WEIGHTS if hasattr(b.experts, n)]
    assert weights and all(is_nf4(w) for w in weights)
    bytes_per_param = sum(packed_bytes(w) for w in weights) / sum(logical_numel(w) for w in weights)
    assert bytes_per_param <= 0.6, bytes_per_param
    with torch.no_grad():
        assert torch.isfinite(q(X).logits).all()


def test_nf4_is_refused_where_it_would_leave_the_experts_bf16(tmp_path):
    """Llama4's experts bypass the interface perft's NF4 path plugs into: a '4-bit' run would keep them bf16."""
    from perft_cli.config import ModelConfig
    from perft_cli.modeling import load_model
    from perft_cli.tiny import save_tiny

    folder = save_tiny(tmp_path / "llama4", "llama4_text")
    with pytest.raises(ModelError, match=r"nf4 cannot quantize .*routed experts .*set model.quantization: none"):
        load_model(ModelConfig(name_or_path=str(folder), quantization="nf4"))
    model, _ = load_model(ModelConfig(name_or_path=str(folder), dtype="float32"))  # unquantized, it loads
    assert find_moe_blocks(model)


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
