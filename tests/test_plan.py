"""`perft plan` from config.json alone: exact parameter counts of method.md's formulas, no weights on disk."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import CONFIGS
from typer.testing import CliRunner

from perft_cli.cli import app

# (hidden D, MoE layers L, experts E, top-k k, q out, v out) of the real models.
SHAPES = {"olmoe-1b-7b": (2048, 16, 64, 8, 2048, 2048), "mixtral-8x7b": (4096, 32, 8, 2, 4096, 1024)}


def expected(shape, variant: str, n: int, k: int, r: int) -> tuple[int, int]:
    """(trainable, activated) straight from method.md's parameter accounting."""
    d, layers, e, base_k, dq, dv = shape
    per = 2 * d * r
    trainable, activated = {
        "perft-r": (n * per + n * d, k * per + n * d),
        "perft-e": (e * per, base_k * per),
        "perft-d": (n * per, n * per),
        "perft-s": (per, per),
        "lora": (r * (d + dq) + r * (d + dv),) * 2,
    }[variant]
    return trainable * layers, activated * layers


def run_plan(tmp_path, model_dir, *overrides):
    only_config = tmp_path / "model"
    only_config.mkdir(exist_ok=True)
    shutil.copy(model_dir / "config.json", only_config / "config.json")  # nothing but config.json
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {only_config}, quantization: nf4}}\n")
    args = ["plan", str(recipe), "--json"] + [x for o in overrides for x in ("--set", o)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("model", sorted(SHAPES))
@pytest.mark.parametrize(
    "variant,n,k,r",
    [
        ("perft-r", 4, 2, 16),
        ("perft-r", 8, 2, 8),
        ("perft-r", 16, 8, 4),
        ("perft-e", 0, 0, 8),
        ("perft-d", 4, 0, 16),
        ("perft-s", 1, 0, 32),
        ("lora", 0, 0, 16),
    ],
)
def test_plan_counts_are_the_formulas(tmp_path, model, variant, n, k, r):
    overrides = [f"adapter.variant={variant}", f"adapter.rank={r}"]
    if n:
        overrides.append(f"adapter.num_experts={n}")
    if k:
        overrides.append(f"adapter.top_k={k}")
    plan = run_plan(tmp_path, CONFIGS / model, *overrides)
    assert (plan["trainable_params"], plan["activated_params"]) == expected(SHAPES[model], variant, n, k, r)
    assert plan["moe_layers"] == SHAPES[model][1]
    assert plan["total_params"] == plan["base_total_params"] + plan["trainable_params"]
    for key in ("trainable_params", "activated_params", "total_params", "moe_layers"):
        assert isinstance(plan[key], int)


def test_plan_olmoe_paper_example(tmp_path):
    """method.md: OLMoE-1B-7B, PERFT-R N=4, K=2, r=16 -> 4,325,376 trainable, 2,228,224 activated."""
    plan = run_plan(tmp_path, CONFIGS / "olmoe-1b-7b", "adapter.num_experts=4", "adapter.top_k=2", "adapter.rank=16")
    assert plan["trainable_params"] == 4_325_376
    assert plan["activated_params"] == 2_228_224
    # platform.md: the real models have 6.92 B total / 1.28 B active parameters
    assert round(plan["base_total_params"] / 1e9, 2) == 6.92
    assert round(plan["base_activated_params"] / 1e9, 2) == 1.28


def test_plan_memory_estimate_for_mixtral_fits_48gb(tmp_path):
    plan = run_plan(
        tmp_path, CONFIGS / "mixtral-8x7b", "train.micro_batch_size=16", "train.gradient_checkpointing=true"
    )
    mem = plan["memory"]
    assert mem["groups"]["routed_experts"]["bytes_per_param"] < 0.6  # the experts are really 4-bit
    assert mem["weights_bytes"] < 0.3 * mem["weights_bf16_bytes"]
    assert mem["total_bytes"] < 48e9


def test_plan_unsupported_model_is_one_line(tmp_path):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {d}}}\n")
    result = CliRunner().invoke(app, ["plan", str(recipe)])
    assert result.exit_code == 1
    assert "not a supported MoE family" in result.stderr and "Mixtral" in result.stderr
    assert "Traceback" not in result.output


def test_plan_names_keys_the_variant_never_reads(tmp_path):
    plan = run_plan(tmp_path, CONFIGS / "olmoe-1b-7b", "adapter.variant=perft-s", "adapter.num_experts=8")
    assert plan["unused_keys"] == ["adapter.num_experts (only perft-r and perft-d read it)"]
    assert run_plan(tmp_path, CONFIGS / "olmoe-1b-7b")["unused_keys"] == []
