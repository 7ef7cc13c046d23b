"""GPU acceptance suite: real-width MoE layers in NF4, memory against `perft plan`, step throughput, in one command.

Run (one H100/H200, at most 8 minutes; nothing is downloaded):
    python benchmarks/gpu_suite.py --device cuda --out DIR
    .venv/bin/python benchmarks/gpu_suite.py --tiny --device cpu --out DIR      # same code, small widths, ~1 min

Writes DIR/gpu_suite.json and DIR/gpu_suite.md. Models are random-weight, built from transformers configs at the real
width of three families, two MoE layers each: Mixtral-8x7B (hidden 4096, intermediate 14336, 8 experts top-2),
OLMoE-1B-7B (2048 / 1024, 64 experts top-8), Qwen3-30B-A3B (2048 / 768, 128 experts top-8), with the real
vocabularies (their logits are a real part of the training memory at batch 16 x 256; --tiny uses widths /16 or /32
and a 512-token vocabulary). Per shape: ``nf4`` (routed experts' bytes/param, logit error against bf16, input
gradients of the NF4 path against the stock path on a dequantized bf16 copy), ``memory`` (one PERFT-R training step
with NF4 and activation checkpointing, measured against `perft plan`'s estimate for the same shape, and extrapolated
per layer to the full depth), ``steps`` (tokens/s and peak bytes of each adapter's training step as `perft train`
runs it: the product's ``forward_backward``, bf16 autocast on CUDA) and ``checkpointing`` (loss and adapter gradients
with and without activation checkpointing). Then the layer-alone adapter-overhead table (benchmarks/
adapter_overhead.py), determinism of two identical steps, and batched against one-at-a-time evaluation
(benchmarks/eval_throughput.py). Every section is guarded (an error is recorded, the rest runs) and timed; a global
budget skips what would not fit.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the step minus ``memory_allocated`` just before it; on the
CPU the peak anonymous RSS (sampled by a thread) over the step minus the RSS before it. ``measured_peak_bytes`` = the
model's weights (its parameters' exact bytes, adapters included) + that increment, so memory held by earlier
sections does not count.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):  # runnable as a plain script on a machine without an install
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

MiB = 2**20
BUDGET_S = 480.0  # 8 minutes on the device machine, the whole suite
PLAN_MIN_BYTES = 512 * MiB  # below this, the runtime's constants dominate a measured peak
PLAN_TOLERANCE = 0.15
VARIANTS = ("frozen-forward", "perft-r", "perft-e", "perft-s", "lora", "peft-experts-lora")
ADAPTERS = {  # the recipe's adapter section of each step variant (rank 8 everywhere)
    "perft-r": dict(variant="perft-r", num_experts=8, top_k=2, rank=8),
    "perft-e": dict(variant="perft-e", rank=8),
    "perft-s": dict(variant="perft-s", rank=8),
    "lora": dict(variant="lora", rank=8),
}


@dataclass
class Shape:
    model_type: str
    label: str
    full_layers: int  # depth of the real model, for the extrapolation
    config: dict[str, Any]


REAL = {
    "mixtral": Shape(
        "mixtral",
        "Mixtral-8x7B",
        32,
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=4096,
            router_aux_loss_coef=0.02,
        ),
    ),
    "olmoe": Shape(
        "olmoe",
        "OLMoE-1B-7B",
        16,
        dict(
            hidden_size=2048,
            intermediate_size=1024,
            num_experts=64,
            num_experts_per_tok=8,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=50304,
            norm_topk_prob=False,
            max_position_embeddings=4096,
            router_aux_loss_coef=0.01,
        ),
    ),
    "qwen3_moe": Shape(
        "qwen3_moe",
        "Qwen3-30B-A3B",
        48,
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=151936,
            norm_topk_prob=True,
            max_position_embeddings=4096,
            router_aux_loss_coef=0.001,
        ),
    ),
}

TINY_VOCAB = 512
TINY = {  # the same families and expert counts, widths / 32 (Mixtral) or / 16, a 512-token vocabulary
    "mixtral": Shape(
        "mixtral",
        "Mixtral-8x7B /32",
        32,
        {**REAL["mixtral"].config, **dict(hidden_size=128, intermediate_size=448, num_attention_heads=4)},
    ),
    "olmoe": Shape(
        "olmoe",
        "OLMoE-1B-7B /16",
        16,
        {**REAL["olmoe"].config, **dict(hidden_size=128, intermediate_size=64, num_attention_heads=4)},
    ),
    "qwen3_moe": Shape(
        "qwen3_moe",
        "Qwen3-30B-A3B /16",
        48,
        {
            **REAL["qwen3_moe"].config,
            **dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_attention_heads=4),
            **dict(num_key_value_heads=2, head_dim=32),
        },
    ),
}
for _s in TINY.values():
    _s.config["vocab_size"] = TINY_VOCAB
    _s.config["num_key_value_heads"] = min(_s.config["num_key_value_heads"], _s.config["num_attention_heads"])


@dataclass
class Settings:
    device: torch.device
    tiny: bool
    batch: int
    seq: int
    repeats: int  # timed steps per variant (median)
    layer_repeats: int  # layer-alone timings (median)
    eval_prompts: int
    budget_s: float
    shapes: dict[str, Shape] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


# --- measuring -------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_tracks_live_memory() -> None:
    """On the CPU: have glibc mmap every allocation of 64 KiB or more (mallopt), so that freed tensors leave the RSS at
    once and an RSS peak measures live memory rather than what the heap kept (glibc only; a no-op elsewhere)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)


class Peak:
    """Peak memory increment of the block: CUDA allocator (max_memory_allocated) or the CPU's anonymous RSS."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, 0

    def __enter__(self) -> Peak:
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        from perft_cli.quant.loader import _trim_heap  # freed heap pages back to the OS, so the baseline is honest

        _trim_heap()
        self.base = self.peak = _rss_anon()
        self.done = threading.Event()
        sys.setswitchinterval(0.0005)

        def sample():
            while not self.done.is_set():
                self.peak = max(self.peak, _rss_anon())
                time.sleep(0.0005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self.done.set()
        self.thread.join()
        sys.setswitchinterval(0.005)
        self.bytes = max(self.peak, _rss_anon()) - self.base


def plan_check(measured: int, estimate: int, floor: int = PLAN_MIN_BYTES, tol: float = PLAN_TOLERANCE) -> dict:
    """Is plan's estimate within ``tol`` of the measured peak? Only judged where the peak is above ``floor``."""
    rel = (estimate - measured) / measured if measured else None
    applies = measured > floor
    return {
        "applies": applies,
        "rel_diff": rel,
        "within": (abs(rel) <= tol) if applies and rel is not None else None,
        "rule": f"|plan - measured| / measured <= {tol} where measured > {floor // MiB} MiB",
    }


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


# --- models ----------------------------------------------------------------------------------------------------


def build_bf16(shape: Shape, cfg: Settings, seed: int = 0):
    """A random bf16 model of ``shape`` with two MoE layers, built directly on the device, frozen, sdpa attention."""
    from transformers import AutoModelForCausalLM

    from perft_cli.tiny import tiny_config

    config = tiny_config(shape.model_type, **{**shape.config, "num_hidden_layers": 2})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(cfg.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.requires_grad_(False)
    return model.eval()


def quantize_linears_(model) -> int:
    """The Linear layers ``load_model_nf4`` would make NF4 (audit.quant_plan), made NF4 in memory (Linear4bit)."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    from perft_cli.quant.audit import quant_plan
    from perft_cli.quant.nf4 import BLOCKSIZE, QUANT_TYPE, disable_cpu_repack_

    names = quant_plan(model).quant_linears
    for name in names:
        lin = model.get_submodule(name)
        q = Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type=QUANT_TYPE,
            device="meta",
        )
        weight = Params4bit(lin.weight.data, requires_grad=False, quant_type=QUANT_TYPE, blocksize=BLOCKSIZE)
        q.weight = weight.to(lin.weight.device)  # quantizes
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    disable_cpu_repack_(model)
    return len(names)


def nf4_like_train(model):
    """``model`` as `perft train` loads it with quantization nf4: routed experts and Linear layers in NF4."""
    from perft_cli.quant import quantize_experts_

    quantize_experts_(model)
    quantize_linears_(model)
    return model


def dequantized_copy_(bf16_model, nf4_model) -> None:
    """Overwrite ``bf16_model``'s routed experts with ``nf4_model``'s dequantized weights."""
    from perft_cli.quant.experts import EXPERT_WEIGHTS, is_experts_module
    from perft_cli.quant.nf4 import dequantize_nf4, is_nf4

    quantized = dict(nf4_model.named_modules())
    for name, module in bf16_model.named_modules():
        if not is_experts_module(module):
            continue
        for w in EXPERT_WEIGHTS:
            q = getattr(quantized[name], w, None)
            if is_nf4(q):
                getattr(module, w).data.copy_(dequantize_nf4(q))


def family_of(model):
    from perft_cli.arch import family_for

    return family_for(model.config.model_type)


def make_batch(vocab: int, cfg: Settings, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (cfg.batch, cfg.seq), generator=g)  # [B, S]
    return {k: ids.clone().to(cfg.device) if k != "attention_mask" else torch.ones_like(ids).to(cfg.device)
            for k in ("input_ids", "attention_mask", "labels")}  # fmt: skip


# --- one training step, as perft train runs it ------------------------------------------------------------------


_ACCELERATOR = None


def accelerator(cfg: Settings):
    """One Accelerator per process: bf16 autocast on CUDA, none on the CPU (make_accelerator's rule)."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator

        cuda = cfg.device.type == "cuda"
        _ACCELERATOR = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    return _ACCELERATOR


class Stepper:
    """The product's ``forward_backward`` (LM loss + both aux losses, autocast, accelerator backward) plus gradient
    clipping and an AdamW update over the trainable parameters, on a model already on the device."""

    def __init__(self, model, attached, cfg: Settings, lr: float = 1e-4):
        self.model, self.cfg = model, cfg
        family = attached.family
        base_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
        self.run = SimpleNamespace(
            accelerator=accelerator(cfg),
            model=model,
            attached=attached,
            base_coef=base_coef if family.returns_aux_loss else None,
            perft_coef=0.01 if attached.variant == "perft-r" else None,
        )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr) if self.params else None

    def backward(self, batch) -> list[float]:
        from perft_cli.training.step import forward_backward, label_count

        return forward_backward(self.run, batch, max(label_count(batch), 1)).tolist()

    def step(self, batch) -> list[float]:
        sums = self.backward(batch)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums


def frozen_forward(model, batch, cfg: Settings) -> None:
    """The frozen model's forward (no grad, the same autocast): the floor a training step is compared with."""
    with torch.no_grad(), accelerator(cfg).autocast():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def attach(model, variant: str):
    from perft_cli.adapters import attach_adapter
    from perft_cli.config import AdapterConfig

    torch.manual_seed(1)
    return attach_adapter(model, AdapterConfig(**ADAPTERS[variant]), family_of(model))


def detach(model, variant: str) -> None:
    from perft_cli.adapters import detach_adapter

    detach_adapter(model, variant)
    model.requires_grad_(False)


def attach_peft_experts(model):
    """What a peft (or axolotl) user does today: LoRA r=8 on the fused routed experts via ``target_parameters``."""
    from peft import LoraConfig, inject_adapter_in_model

    from perft_cli.perft import RoutingRecorder

    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=[],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    torch.manual_seed(1)
    inject_adapter_in_model(lora, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()
    return SimpleNamespace(variant="lora", family=family_of(model), recorder=RoutingRecorder(), num_experts=0, top_k=0)


def set_checkpointing(model, on: bool) -> None:
    from perft_cli.training.setup import enable_checkpointing

    if on:
        enable_checkpointing(model)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def params_bytes(module) -> int:
    from perft_cli.quant.nf4 import is_nf4, packed_bytes

    return sum(packed_bytes(p) if is_nf4(p) else p.numel() * p.element_size() for p in module.parameters())


def plan_memory(shape: Shape, layers: int, cfg: Settings, adapter: dict, checkpointing: bool) -> dict:
    """`perft plan`'s memory model (run_plan on a config.json alone) for ``shape`` at ``layers`` layers."""
    from perft_cli.config import recipe_from_dict
    from perft_cli.plan import run_plan
    from perft_cli.tiny import tiny_config

    config = tiny_config(shape.model_type, **{**shape.config, "num_hidden_layers": layers})
    with tempfile.TemporaryDirectory(prefix="perft-gpu-suite-") as tmp:
        config.save_pretrained(tmp)
        recipe = recipe_from_dict(
            {
                "model": {"name_or_path": tmp, "quantization": "nf4"},
                "adapter": adapter,
                "data": {"cutoff_len": cfg.seq},
                "train": {
                    "batch_size": cfg.batch,
                    "micro_batch_size": cfg.batch,
                    "gradient_checkpointing": checkpointing,
                },
            }
        )
        return run_plan(recipe)["memory"]


# --- sections ----------------------------------------------------------------------------------------------------


class Suite:
    """Runs guarded, timed sections under a global time budget."""

    def __init__(self, cfg: Settings):
        self.cfg, self.start = cfg, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def section(self, name: str, fn: Callable[[], dict], estimate_s: float) -> dict:
        if self.elapsed() + estimate_s > self.cfg.budget_s:
            note = (
                f"skipped: {self.elapsed():.0f} s used, this section needs about {estimate_s:.0f} s, "
                f"budget {self.cfg.budget_s:.0f} s"
            )
            print(f"[gpu_suite] {name}: {note}", flush=True)
            return {"skipped": note}
        t0 = time.monotonic()
        print(f"[gpu_suite] {name} ...", flush=True)
        try:
            out = fn()
        except Exception as e:  # one failure must not stop the rest of the suite
            out = {
                "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                "traceback": traceback.format_exc().splitlines()[-6:],
            }
            if self.cfg.device.type == "cuda":
                torch.cuda.empty_cache()
        out["wall_s"] = round(time.monotonic() - t0, 2)
        print(f"[gpu_suite] {name}: {out.get('error', 'ok')} ({out['wall_s']} s)", flush=True)
        return out


def section_nf4(shape: Shape, cfg: Settings, models: dict) -> dict:
    """Routed experts' bytes/param; logits against bf16; NF4 input gradients against a dequantized bf16 copy."""
    from perft_cli.perft.frozen_experts import select_frozen_experts
    from perft_cli.quant import audit, quantize_experts_
    from perft_cli.training.step import token_nll_sum

    bf16 = build_bf16(shape, cfg)
    batch = make_batch(bf16.config.vocab_size, cfg)
    with torch.no_grad():
        ref = bf16(input_ids=batch["input_ids"]).logits.float()
    nf4 = quantize_experts_(copy.deepcopy(bf16))
    experts = audit(nf4, quantization="nf4")["routed_experts"]
    with torch.no_grad():
        err_experts = rel_err(nf4(input_ids=batch["input_ids"]).logits.float(), ref)
    del ref
    dequantized_copy_(bf16, nf4)  # bf16 now holds the dequantized NF4 experts
    # ... and runs perft's frozen experts Function on them (perft train's bf16 path), so the gradient check isolates
    # the NF4 weights: the stock grouped_mm's bf16 backward accumulates in bf16 (index_put_), 2x further from exact.
    select_frozen_experts(bf16)

    def input_grad(model):
        emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
        loss = token_nll_sum(model(inputs_embeds=emb).logits, batch["labels"]) / cfg.tokens
        loss.backward()
        return emb.grad.float()

    g_nf4, g_deq = input_grad(nf4), input_grad(bf16)
    grad = {
        "input_grad_rel_diff": rel_err(g_nf4, g_deq),
        "input_grad_max_abs_diff": float((g_nf4 - g_deq).abs().max()),
        "input_grad_bit_identical": bool(torch.equal(g_nf4, g_deq)),
    }
    del g_nf4, g_deq
    quantize_linears_(nf4)  # now as `perft train` loads it with quantization: nf4
    whole = audit(nf4, quantization="nf4")
    with torch.no_grad():
        deq_logits = bf16(input_ids=batch["input_ids"]).logits.float()
        err_all = rel_err(nf4(input_ids=batch["input_ids"]).logits.float(), deq_logits)
    models["nf4"], models["bf16_dequantized"] = nf4, bf16
    return {
        "bytes_per_param": experts["bytes_per_param"],
        "routed_experts_params": experts["params"],
        "routed_experts_bytes": experts["bytes"],
        "logit_rel_err": err_experts,
        **grad,
        "model_bytes_nf4": whole["total_bytes"],
        "model_bytes_bf16": whole["bf16_bytes"],
        "logit_rel_err_linears_too_vs_dequantized": err_all,
        "notes": "logit_rel_err: experts-only NF4 vs the bf16 model; input gradients: the NF4 experts path vs the "
        "same Function (perft_frozen) on a bf16 copy holding the dequantized weights (so ~0 expected); "
        "then attention Linears to NF4 too, as perft train loads nf4",
    }


def ensure_nf4(shape: Shape, cfg: Settings, models: dict):
    if "nf4" not in models:  # the nf4 section failed before it kept a model: build one directly
        models["nf4"] = nf4_like_train(build_bf16(shape, cfg))
    return models["nf4"]


def section_memory(shape: Shape, cfg: Settings, models: dict) -> dict:
    """One PERFT-R step, NF4 + activation checkpointing, measured against plan; per layer from 2 vs 1 layer."""
    model = ensure_nf4(shape, cfg, models)
    batch = make_batch(model.config.vocab_size, cfg)
    attached = attach(model, "perft-r")
    try:
        set_checkpointing(model, True)
        model.train()
        weights = params_bytes(model)
        Stepper(model, attached, cfg).step(batch)  # warm-up: first-call allocations would count as one layer's
        increments = {}
        for layers in (2, 1):
            model.config.num_hidden_layers = layers  # the decoder runs layers[:num_hidden_layers]
            stepper = Stepper(model, attached, cfg)
            with Peak(cfg.device) as peak:
                stepper.step(batch)
            increments[layers] = peak.bytes
            del stepper
    finally:
        model.config.num_hidden_layers = 2
        set_checkpointing(model, False)
        model.eval()
        detach(model, "perft-r")
    per_layer = params_bytes_of_layer(model, attached) + increments[2] - increments[1]
    measured = weights + increments[2]
    plan2 = plan_memory(shape, 2, cfg, ADAPTERS["perft-r"], checkpointing=True)
    plan_full = plan_memory(shape, shape.full_layers, cfg, ADAPTERS["perft-r"], checkpointing=True)
    full = measured + (shape.full_layers - 2) * per_layer
    transient = dequant_transient_bytes(model)
    return {
        "batch": [cfg.batch, cfg.seq],
        "measured_peak_bytes": measured,
        "measured_weights_bytes": weights,
        "measured_step_increment_bytes": increments[2],
        "measured_step_increment_1_layer_bytes": increments[1],
        "plan_estimate_bytes": plan2["total_bytes"],
        "plan_weights_bytes": plan2["weights_bytes"],
        "plan_activation_bytes": plan2["activation_bytes"],
        "plan_adapter_grad_optimizer_bytes": plan2["adapter_grad_optimizer_bytes"],
        "plan_check": plan_check(measured, plan2["total_bytes"]),
        "per_layer_bytes": per_layer,
        "full_layers": shape.full_layers,
        "full_model_extrapolated_bytes": full,
        "plan_full_model_estimate_bytes": plan_full["total_bytes"],
        "full_model_rel_diff": (plan_full["total_bytes"] - full) / full,
        "nf4_dequant_transient_bytes": transient,
        "plan_nf4_dequant_bytes": plan2.get("nf4_dequant_bytes"),  # the same term, in plan's model since this suite
        "method": "measured = parameter bytes (exact) + peak increment of one step after a warm-up step (CUDA "
        "allocator / CPU anon RSS); per layer = layer 2's parameter bytes + (step increment with 2 layers - with 1)",
    }


def dequant_transient_bytes(model) -> int:
    """The largest fused expert projection in bf16: what the NF4 path holds dequantized at a time, in forward and
    again in backward (quant/experts.py), as perft plan counts it."""
    from perft_cli.plan import nf4_dequant_bytes

    return nf4_dequant_bytes(model, torch.bfloat16)


def params_bytes_of_layer(model, attached) -> int:
    """Bytes of the decoder layer holding the last MoE block (its PERFT-R adapter is a submodule of the block)."""
    block = attached.blocks[-1].block
    layer = next(la for la in model.model.layers if any(m is block for m in la.modules()))
    return params_bytes(layer)


def section_checkpointing(shape: Shape, cfg: Settings, models: dict) -> dict:
    """PERFT-R loss and adapter gradients with and without activation checkpointing (same seed, dropout on)."""
    model = ensure_nf4(shape, cfg, models)
    batch = make_batch(model.config.vocab_size, cfg)
    attached = attach(model, "perft-r")
    try:
        model.train()
        stepper = Stepper(model, attached, cfg)
        results = {}
        for on in (False, True):
            set_checkpointing(model, on)
            torch.manual_seed(2)
            sums = stepper.backward(batch)
            grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
            index = [ix.clone() for _, ix in attached.recorder.index]
            model.zero_grad(set_to_none=True)
            results[on] = (sums, grads, index)
    finally:
        set_checkpointing(model, False)
        model.eval()
        detach(model, "perft-r")
    (s0, g0, i0), (s1, g1, i1) = results[False], results[True]
    rel = [float((g1[n] - g0[n]).abs().max() / g0[n].abs().max().clamp_min(1e-30)) for n in g0]
    finite = all(bool(torch.isfinite(g).all()) for g in (*g0.values(), *g1.values()))
    return {
        "loss_plain": s0[0],
        "loss_checkpointed": s1[0],
        "loss_diff": abs(s1[0] - s0[0]),
        "grad_max_rel_diff": max(rel) if rel else None,
        "grad_tensors": len(g0),
        "same_grad_names": sorted(g0) == sorted(g1),
        "grads_finite": finite,
        "adapter_routing_identical": len(i0) == len(i1)
        and all(torch.equal(a, b) for a, b in zip(i0, i1, strict=True)),
        "definition": "grad_max_rel_diff = max over adapter tensors of max|g_ckpt - g_plain| / max|g_plain|",
    }


def time_steps(fn: Callable[[], Any], cfg: Settings) -> tuple[float, int]:
    """(median seconds, peak increment) of ``fn`` over cfg.repeats timed calls after one warm-up call (outside the
    peak: a step's optimizer state already exists, first-call allocations do not count)."""
    times = []
    fn()
    with Peak(cfg.device) as peak:
        for _ in range(cfg.repeats):
            sync(cfg.device)
            t0 = time.perf_counter()
            fn()
            sync(cfg.device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), peak.bytes


def section_steps(shape: Shape, cfg: Settings, models: dict, suite: Suite) -> dict:
    """tokens/s and peak bytes of each variant's training step (no activation checkpointing: train's default)."""
    out: dict[str, Any] = {"batch": [cfg.batch, cfg.seq], "checkpointing": False}

    def one(variant: str) -> dict:
        if variant == "peft-experts-lora":
            model = models.get("bf16_dequantized") or build_bf16(shape, cfg)
            models["bf16_dequantized"] = model
            attached = attach_peft_experts(model)
            base = "bf16 experts (peft wraps plain 3D parameters, not NF4 ones)"
        else:
            model = ensure_nf4(shape, cfg, models)
            attached = attach(model, variant) if variant != "frozen-forward" else None
            base = "NF4 experts and Linear layers"
        batch = make_batch(model.config.vocab_size, cfg)
        try:
            if attached is None:
                seconds, peak = time_steps(lambda: frozen_forward(model, batch, cfg), cfg)
            else:
                model.train()
                stepper = Stepper(model, attached, cfg)
                seconds, peak = time_steps(lambda: stepper.step(batch), cfg)
                trainable = sum(p.numel() for p in stepper.params)
        finally:
            model.eval()
            if variant == "peft-experts-lora":
                models.pop("bf16_dequantized", None)  # peft's wrappers stay: the model is not used again
            elif attached is not None:
                detach(model, variant)
        row = {"tokens_per_s": cfg.tokens / seconds, "step_s": seconds, "peak_bytes": peak, "base": base}
        if attached is not None:
            row["trainable_params"] = trainable
        return row

    for variant in VARIANTS:
        out[variant] = suite.section(f"  step {variant}", lambda v=variant: one(v), 3 if cfg.tiny else 8)
    out["experts_path"] = suite.section(
        "  experts path", lambda: experts_path(shape, cfg, models), 3 if cfg.tiny else 8
    )
    fwd = out["frozen-forward"].get("step_s")
    if fwd:
        for variant in VARIANTS[1:]:
            if "step_s" in out[variant]:
                out[variant]["step_over_frozen_forward"] = out[variant]["step_s"] / fwd
    return out


def experts_path(shape: Shape, cfg: Settings, models: dict) -> dict:
    """The frozen bf16 base's experts through transformers' grouped_mm and through perft_frozen (what perft train
    selects): frozen forward and PERFT-R step, the two paths alternating step by step on one model."""
    from perft_cli.perft.frozen_experts import IMPLEMENTATION, select_frozen_experts

    model = models.get("bf16_dequantized") or build_bf16(shape, cfg)
    batch = make_batch(model.config.vocab_size, cfg)
    paths = {"stock": "grouped_mm", "perft": IMPLEMENTATION}
    out: dict[str, Any] = {"base": "bf16 experts"}
    attached = None
    try:
        for what in ("frozen_forward", "perft_r_step"):
            if what == "perft_r_step":
                attached = attach(model, "perft-r")
                model.train()
                fn = partial(Stepper(model, attached, cfg).step, batch)
            else:
                fn = partial(frozen_forward, model, batch, cfg)
            times: dict[str, list[float]] = {p: [] for p in paths}
            for r in range(cfg.repeats + 1):
                for path, impl in paths.items():
                    select_frozen_experts(model, impl)
                    sync(cfg.device)
                    t0 = time.perf_counter()
                    fn()
                    sync(cfg.device)
                    if r:  # the first round warms both paths up
                        times[path].append(time.perf_counter() - t0)
            stock, perft = (statistics.median(times[p]) for p in paths)
            out[what] = {"stock_s": stock, "perft_s": perft, "speedup": stock / perft}
    finally:
        select_frozen_experts(model)
        model.eval()
        if attached is not None:
            detach(model, "perft-r")
    return out


def section_adapter_overhead(cfg: Settings) -> dict:
    """benchmarks/adapter_overhead.py's layer-alone table at the paper's batch: PERFT-R K=2 r=8, N in 2..64."""
    from adapter_overhead import layer_alone

    hidden = TINY["olmoe"].config["hidden_size"] if cfg.tiny else REAL["olmoe"].config["hidden_size"]
    ns = (2, 8, 32, 64)
    ms, act = layer_alone(ns, 2, 8, cfg.tokens, hidden, cfg.device, cfg.layer_repeats)
    rows = {
        str(n): {
            "auto_ms": ms[n, "auto"],
            "grouped_ms": ms[n, "grouped"],
            "loop_ms": ms[n, "loop"],
            "loop_over_auto": ms[n, "loop"] / ms[n, "auto"],
            "activated_params": act[n],
        }
        for n in ns
    }
    return {
        "tokens": cfg.tokens,
        "hidden": hidden,
        "top_k": 2,
        "rank": 8,
        "repeats": cfg.layer_repeats,
        "rows": rows,
        "ratio_n64_n2_auto": ms[64, "auto"] / ms[2, "auto"],
        "ratio_n64_n2_grouped": ms[64, "grouped"] / ms[2, "grouped"],
        "ratio_n64_n2_activated_params": act[64] / act[2],
        "stacked_beats_loop_n_ge_8": all(ms[n, "auto"] < ms[n, "loop"] for n in ns if n >= 8),
    }


def section_determinism(cfg: Settings) -> dict:
    """Two identical PERFT-R steps (same adapter init, same seed, same batch) on the OLMoE shape in NF4."""
    from perft_cli.perft import adapter_state_dict, load_adapter_state_dict

    shape = cfg.shapes["olmoe"]
    model = nf4_like_train(build_bf16(shape, cfg))
    batch = make_batch(model.config.vocab_size, cfg)
    attached = attach(model, "perft-r")
    model.train()
    # adapter_state_dict's CPU tensors alias the parameters on a CPU model: clone, or the step would move "init" too
    init = {n: t.clone() for n, t in adapter_state_dict(model).items()}
    after = []
    for _ in range(2):
        load_adapter_state_dict(model, init)
        torch.manual_seed(3)
        Stepper(model, attached, cfg).step(batch)
        after.append({n: t.clone() for n, t in adapter_state_dict(model).items()})
    a, b = after
    diff = max(float((a[n].float() - b[n].float()).abs().max()) for n in a)
    changed = any(not torch.equal(a[n], init[n]) for n in a)
    del model
    return {
        "bit_identical": all(torch.equal(a[n], b[n]) for n in a),
        "max_abs_diff": diff,
        "adapters_changed_by_step": changed,
        "tensors": len(a),
    }


def section_eval_batching(cfg: Settings) -> dict:
    """benchmarks/eval_throughput.py's comparison: batched `perft eval` generation vs one prompt at a time."""
    from eval_throughput import make_prompts, timed

    from perft_cli.adapters import attach_adapter
    from perft_cli.config import AdapterConfig, EvalConfig, ModelConfig
    from perft_cli.modeling import load_model, load_tokenizer
    from perft_cli.tiny import save_tiny

    with tempfile.TemporaryDirectory(prefix="perft-gpu-suite-") as tmp:
        mcfg = ModelConfig(name_or_path=str(save_tiny(tmp, "olmoe", seed=0)), dtype="float32")
        model, family = load_model(mcfg)
        tokenizer = load_tokenizer(mcfg)
    torch.manual_seed(1)
    attach_adapter(model, AdapterConfig(variant="perft-r", num_experts=4, top_k=2, rank=8), family)
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "perft_B" in name:
                p.normal_(0.0, 0.05)
    model.to(cfg.device)
    prompts = make_prompts(cfg.eval_prompts, "commonsense")
    timed(model, tokenizer, prompts[:2], 4, batch_size=2)  # warm-up
    plain, t_plain, _ = timed(model, tokenizer, prompts, 4, batch_size=1, shared_prefill=False)  # LLM-Adapters' loop
    one, t_one, _ = timed(model, tokenizer, prompts, 4, batch_size=1)
    batched, t_batched, _ = timed(
        model, tokenizer, prompts, 4, batch_tokens=EvalConfig().batch_tokens
    )  # perft eval: token-budget batches, shared prefix
    same = sum(a == b == c for a, b, c in zip(plain, one, batched, strict=True))
    return {
        "model": "tiny OLMoE (perft_cli.tiny) + random PERFT-R, fp32, 4 beams, 4 new tokens (measures the loop)",
        "prompts": len(prompts),
        "batch_size": "by eval.batch_tokens",
        "plain_loop_s": t_plain,
        "one_at_a_time_s": t_one,
        "batched_s": t_batched,
        "speedup": t_plain / t_batched,
        "speedup_vs_one_at_a_time": t_one / t_batched,
        "identical_responses": same == len(prompts),
        "same_responses": same,
    }


# --- environment and report -------------------------------------------------------------------------------------


def environment(cfg: Settings) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    hw: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if cfg.device.type == "cuda":
        props = torch.cuda.get_device_properties(cfg.device)
        hw.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "versions": versions,
        "hardware": hw,
        "device": str(cfg.device),
        "tiny": cfg.tiny,
        "batch": [cfg.batch, cfg.seq],
        "budget_s": cfg.budget_s,
        "vocab": (
            f"reduced to {TINY_VOCAB} tokens (--tiny: small widths, where a real vocabulary's head would dominate)"
            if cfg.tiny
            else "real vocabularies (Mixtral 32000, OLMoE 50304, Qwen3 151936): at batch 16 x 256 the fp32 logits "
            "and their gradient are a real part of the training memory that plan models"
        ),
    }


def _mib(x) -> str:
    return f"{x / MiB:,.0f} MiB" if isinstance(x, int | float) else "-"


def _f(x, fmt: str = ".3g") -> str:
    return format(x, fmt) if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def _status(sec: dict) -> str | None:
    if "error" in sec:
        return f"error: {sec['error']}"
    if "skipped" in sec:
        return sec["skipped"]
    return None


def render_md(result: dict) -> str:
    env = result["environment"]
    hw = env["hardware"]
    lines = [
        "# perft GPU suite" + (" (--tiny)" if env["tiny"] else ""),
        "",
        f"- date: {env['date']}; total wall {result.get('wall_s', 0):.0f} s (budget {env['budget_s']:.0f} s)",
        f"- device: {env['device']}"
        + (f" ({hw['gpu']}, {_mib(hw['gpu_memory_bytes'])}, CUDA {hw['cuda']})" if "gpu" in hw else "")
        + f"; CPU {hw['cpu']} x{hw['cpu_count']}, torch threads {hw['torch_threads']}",
        "- versions: python " + env["python"] + ", " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- batch {env['batch'][0]} x {env['batch'][1]} tokens; random weights, two MoE layers per shape",
        f"- vocabulary: {env['vocab']}",
        "",
    ]
    for key, sh in result["shapes"].items():
        lines += [f"## {key}: {sh.get('label', '')}", "", sh.get("config_summary", ""), ""]
        nf4 = sh.get("nf4", {})
        lines.append(f"**nf4** ({_f(nf4.get('wall_s'))} s)")
        lines.append(
            _status(nf4)
            or (
                f"routed experts {nf4['bytes_per_param']:.4f} B/param; logits vs bf16 (experts NF4) rel err "
                f"{nf4['logit_rel_err']:.4f}; input gradient NF4 path vs dequantized bf16 copy: rel diff "
                f"{nf4['input_grad_rel_diff']:.2e}, bit-identical {nf4['input_grad_bit_identical']}; model "
                f"{_mib(nf4['model_bytes_nf4'])} NF4 vs {_mib(nf4['model_bytes_bf16'])} bf16"
            )
        )
        mem = sh.get("memory", {})
        lines += ["", f"**memory**, PERFT-R N=8 K=2 r=8, NF4, activation checkpointing ({_f(mem.get('wall_s'))} s)"]
        if _status(mem):
            lines.append(_status(mem))
        else:
            pc = mem["plan_check"]
            verdict = (
                f"within {PLAN_TOLERANCE:.0%}: {pc['within']}"
                if pc["applies"]
                else f"not judged (peak <= {PLAN_MIN_BYTES // MiB} MiB)"
            )
            lines += [
                "",
                "| | measured | plan |",
                "|---|---:|---:|",
                f"| two layers, total | {_mib(mem['measured_peak_bytes'])} | {_mib(mem['plan_estimate_bytes'])} |",
                f"| weights | {_mib(mem['measured_weights_bytes'])} | {_mib(mem['plan_weights_bytes'])} |",
                f"| step increment (activations, grads, AdamW) | {_mib(mem['measured_step_increment_bytes'])} | "
                f"{_mib(mem['plan_activation_bytes'] + mem['plan_adapter_grad_optimizer_bytes'])} |",
                f"| per layer | {_mib(mem['per_layer_bytes'])} | |",
                f"| full model ({mem['full_layers']} layers) | {_mib(mem['full_model_extrapolated_bytes'])} "
                f"(extrapolated) | {_mib(mem['plan_full_model_estimate_bytes'])} |",
                "",
                f"plan vs measured (two layers): {_f(pc['rel_diff'], '+.1%')}, {verdict}; full model "
                f"{_f(mem['full_model_rel_diff'], '+.1%')}. The NF4 path's dequantized projection: "
                f"{_mib(mem['nf4_dequant_transient_bytes'])} here, {_mib(mem['plan_nf4_dequant_bytes'] or 0)} in plan",
            ]
        steps = sh.get("steps", {})
        lines += [
            "",
            f"**steps** (no checkpointing; peak increment over the timed steps, after a warm-up step; "
            f"{_f(steps.get('wall_s'))} s)",
        ]
        if _status(steps):
            lines.append(_status(steps))
        else:
            lines += [
                "",
                "| variant | tokens/s | step / frozen forward | peak increment | base |",
                "|---|---:|---:|---:|---|",
            ]
            for v in VARIANTS:
                row = steps.get(v, {})
                if _status(row):
                    lines.append(f"| {v} | {_status(row)} | | | |")
                    continue
                ratio = _f(row.get("step_over_frozen_forward"), ".2f") if v != "frozen-forward" else "1"
                lines.append(
                    f"| {v} | {row['tokens_per_s']:,.0f} | {ratio} | {_mib(row['peak_bytes'])} | {row['base']} |"
                )
            ep = steps.get("experts_path", {})
            lines.append("")
            lines.append(
                _status(ep)
                or "experts path (bf16 base), stock grouped_mm / perft_frozen: frozen forward "
                f"{ep['frozen_forward']['speedup']:.2f}x, PERFT-R step {ep['perft_r_step']['speedup']:.2f}x "
                "(above 1: perft's path is faster)"
            )
        ck = sh.get("checkpointing", {})
        lines += ["", f"**checkpointing** ({_f(ck.get('wall_s'))} s)"]
        lines.append(
            _status(ck)
            or (
                f"loss diff {_f(ck['loss_diff'], '.2e')}, adapter gradients max rel diff "
                f"{_f(ck['grad_max_rel_diff'], '.2e')} over {ck['grad_tensors']} tensors, "
                f"finite {ck['grads_finite']}, "
                f"PERFT-R routing identical on recompute {ck['adapter_routing_identical']}"
            )
        )
        lines.append("")
    ao = result.get("adapter_overhead", {})
    lines += [f"## adapter overhead, one PERFT-R layer alone ({_f(ao.get('wall_s'))} s)", ""]
    if _status(ao):
        lines.append(_status(ao))
    else:
        lines += [
            f"[{ao['tokens']}, {ao['hidden']}] tokens, K={ao['top_k']}, r={ao['rank']}, forward+backward, median of "
            f"{ao['repeats']}",
            "",
            "| N | auto ms | grouped ms | per-expert loop ms | loop / auto | activated params |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for n, r in ao["rows"].items():
            lines.append(
                f"| {n} | {r['auto_ms']:.3f} | {r['grouped_ms']:.3f} | {r['loop_ms']:.3f} | "
                f"{r['loop_over_auto']:.2f}x | {r['activated_params']:,} |"
            )
        lines += [
            "",
            f"N=64 / N=2: {ao['ratio_n64_n2_auto']:.2f} (auto), {ao['ratio_n64_n2_grouped']:.2f} (grouped); "
            f"activated parameters {ao['ratio_n64_n2_activated_params']:.2f}; bank beats loop for N >= 8: "
            f"{ao['stacked_beats_loop_n_ge_8']}",
        ]
    det = result.get("determinism", {})
    lines += ["", f"## determinism ({_f(det.get('wall_s'))} s)", ""]
    lines.append(
        _status(det)
        or f"two identical PERFT-R steps: bit-identical adapters {det['bit_identical']}, max abs diff "
        f"{_f(det['max_abs_diff'], '.2e')} (adapters moved: {det['adapters_changed_by_step']})"
    )
    ev = result.get("eval_batching", {})
    lines += ["", f"## eval batching ({_f(ev.get('wall_s'))} s)", ""]
    lines.append(
        _status(ev)
        or f"{ev['prompts']} prompts, {ev['model']}: batched ({ev['batch_size']}) {ev['speedup']:.2f}x faster than "
        f"the plain one-at-a-time loop ({ev['speedup_vs_one_at_a_time']:.2f}x than perft's own one at a time); "
        f"identical responses {ev['identical_responses']} ({ev['same_responses']}/{ev['prompts']})"
    )
    return "\n".join(lines) + "\n"


def config_summary(shape: Shape) -> str:
    c = shape.config
    experts = c.get("num_local_experts") or c.get("num_experts")
    inter = c.get("moe_intermediate_size") or c["intermediate_size"]
    return (
        f"hidden {c['hidden_size']}, expert intermediate {inter}, {experts} experts top-{c['num_experts_per_tok']}, "
        f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} kv, vocab {c['vocab_size']}, 2 of "
        f"{shape.full_layers} layers"
    )


def write(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_suite.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "gpu_suite.md").write_text(render_md(result))


def settings(tiny: bool, device: str, budget: float) -> Settings:
    dev = torch.device(device)
    if tiny:
        return Settings(dev, True, 4, 64, 2, 3, 8, budget, TINY)
    return Settings(dev, False, 16, 256, 3, 20, 32, budget, REAL)


def run_shape(key: str, shape: Shape, cfg: Settings, suite: Suite, estimates: dict) -> dict:
    """The four sections of one shape; the models they share live in ``models`` and go when it returns."""
    models: dict = {}
    sh: dict[str, Any] = {"label": shape.label, "config_summary": config_summary(shape)}
    sh["nf4"] = suite.section(f"{key}.nf4", lambda: section_nf4(shape, cfg, models), estimates["nf4"])
    sh["memory"] = suite.section(f"{key}.memory", lambda: section_memory(shape, cfg, models), estimates["memory"])
    sh["checkpointing"] = suite.section(
        f"{key}.checkpointing", lambda: section_checkpointing(shape, cfg, models), estimates["checkpointing"]
    )
    sh["steps"] = suite.section(f"{key}.steps", lambda: section_steps(shape, cfg, models, suite), estimates["steps"])
    models.clear()
    return sh


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="small widths, batch 4 x 64 (CPU smoke run, ~1 min)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole suite (default 480)")
    ap.add_argument("--shapes", default="mixtral,olmoe,qwen3_moe", help="comma-separated subset, in this order")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    os.environ.setdefault("TQDM_DISABLE", "1")
    cfg = settings(args.tiny, args.device, args.budget)
    if cfg.device.type == "cpu":
        rss_tracks_live_memory()
    suite = Suite(cfg)
    result: dict[str, Any] = {"environment": environment(cfg), "shapes": {}}
    # Cheap top-level sections first: they fit even when a real-width shape runs long.
    result["adapter_overhead"] = suite.section(
        "adapter_overhead", lambda: section_adapter_overhead(cfg), 5 if cfg.tiny else 20
    )
    result["determinism"] = suite.section("determinism", lambda: section_determinism(cfg), 5 if cfg.tiny else 15)
    result["eval_batching"] = suite.section(
        "eval_batching", lambda: section_eval_batching(cfg), 10 if cfg.tiny else 20
    )
    write(args.out, result)
    estimates = (
        dict(nf4=5, memory=5, checkpointing=3, steps=10)
        if cfg.tiny
        else dict(nf4=25, memory=20, checkpointing=10, steps=30)
    )
    for key in args.shapes.split(","):
        result["shapes"][key] = run_shape(key, cfg.shapes[key], cfg, suite, estimates)
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        result["wall_s"] = suite.elapsed()
        write(args.out, result)  # after every shape: a run cut short still leaves its numbers
    result["wall_s"] = suite.elapsed()
    write(args.out, result)
    print(render_md(result))
    return result


if __name__ == "__main__":
    main()
