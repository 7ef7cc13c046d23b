"""Tiny random-weight MoE models of every supported family, for tests, benchmarks and smoke runs.

No weights are downloaded: each model is built from a transformers config. ``save_tiny`` writes a model directory
(safetensors + config + a byte-level tokenizer) that the real loading code reads like any hub checkpoint.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig

from perft_cli.arch import EXPERT_COUNT_NAMES, TOP_K_NAMES, supported_model_types

# Shared tiny shape. Dims are multiples of 64 so the 4-bit paths (bitsandbytes blocksize 64) work on them.
_BASE: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    # The byte tokenizer's specials (see byte_tokenizer): <pad>=256, <s>=257, </s>=258.
    pad_token_id=256,
    bos_token_id=257,
    eos_token_id=258,
)

# DeepSeek-V2/V3: multi-head latent attention, one shared expert, the first layer dense (no adapter there).
_DEEPSEEK: dict[str, Any] = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=64,
    n_shared_experts=1,
    first_k_dense_replace=1,
    num_hidden_layers=3,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    num_key_value_heads=4,
)

_FAMILY: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen2_moe": dict(
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "qwen3_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True, head_dim=16
    ),
    "deepseek_v2": dict(_DEEPSEEK, n_group=1, topk_group=1),
    "deepseek_v3": dict(_DEEPSEEK, n_group=2, topk_group=1),  # V3 routes within groups of experts
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        layer_types=["full_attention", "full_attention"],
        sliding_window=128,
        # gpt-oss uses YaRN with factor 32 over 4096 positions; matching the length avoids a config warning.
        max_position_embeddings=131072,
    ),
}

FAMILIES = tuple(_FAMILY)

# The OLMoE-shaped CPU benchmark model of platform.md's speed reference (benchmarks/): 16 experts top-4 by default.
BENCH_OLMOE: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_experts=16,
    num_experts_per_tok=4,
    vocab_size=1024,
    num_attention_heads=4,
    num_key_value_heads=4,
)


# Any other MoE model type: its config class's defaults shrunk the way transformers' own CausalLMModelTester does it
# (only the keyword names the config's __init__ takes are passed), in multiples of 64 for the 4-bit paths.
_GENERIC: dict[str, Any] = dict(
    _BASE,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
    expert_ffn_hidden_size=64,
    head_dim=16,
    # multi-head latent attention (DeepSeek style)
    kv_lora_rank=32,
    q_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    # Mamba / linear-attention layers of hybrids
    mamba_n_groups=1,
    mamba_n_heads=8,
    mamba_head_dim=16,
    mamba_d_state=16,
    mamba_d_conv=4,
    mamba_expand=2,
    mamba_chunk_size=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    # dense-layer rules: keep the second of the two layers an MoE layer
    first_k_dense_replace=1,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    moe_layer_freq=1,
    expert_interval=1,
    is_moe=True,
    enable_moe_block=True,
    # grouped top-k (DeepSeek-V3 style): 2 groups of 4 experts, pick 1 group
    n_group=2,
    num_expert_group=2,
    topk_group=1,
)
_GENERIC_EXPERTS, _GENERIC_TOP_K = 8, 2
# What a generic shrink cannot guess: the family's own validation rules and layer plans.
_GENERIC_FIX: dict[str, dict[str, Any]] = {
    "zaya": dict(num_experts_per_tok=1),  # "ZAYA currently supports num_experts_per_tok=1 only"
    "dots1": dict(n_shared_experts=1),  # its default None breaks the shared expert's width
    # Hybrids: one Mamba / linear-attention / conv layer and one attention layer (a cache of linear layers only
    # fails). lfm2_moe has no default plan; Qwen's full_attention_interval is read from **kwargs, not a field.
    "bailing_hybrid": dict(layer_group_size=2),
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention"]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=0),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "qwen3_next": dict(full_attention_interval=2),
    "qwen3_5_moe_text": dict(full_attention_interval=2),
    # Qwen4-Exp's sparse-attention indexer has no defaults.
    "qwen4_exp_text": dict(
        full_attention_interval=2,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=16,
        indexer_compress_ratio=4,
    ),
}
# Layer plans that name each layer's FFN: the second layer sparse (first_k_dense_replace is not read by all of them).
_MLP_LAYER_TYPES = ["dense", "sparse"]


def generic_tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config of any model type from its config class's defaults (see _GENERIC); ``overrides`` win."""
    cls = CONFIG_MAPPING[model_type]
    accepted = set(inspect.signature(cls.__init__).parameters)
    kwargs = {k: v for k, v in _GENERIC.items() if k in accepted or k == "pad_token_id"}
    kwargs |= {k: _GENERIC_EXPERTS for k in EXPERT_COUNT_NAMES if k in accepted}
    kwargs |= {k: _GENERIC_TOP_K for k in TOP_K_NAMES if k in accepted}
    if "kv_lora_rank" in accepted:  # multi-head latent attention has as many key/value heads as query heads
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", _BASE["num_attention_heads"])
    if "mlp_layer_types" in accepted:
        kwargs["mlp_layer_types"] = _MLP_LAYER_TYPES
    text = getattr(cls, "sub_configs", {}).get("text_config")
    if "text_config" in accepted and text is not None and getattr(text, "model_type", None) in CONFIG_MAPPING:
        kwargs["text_config"] = generic_tiny_config(text.model_type).to_dict()  # a multimodal model's LM
    kwargs |= _GENERIC_FIX.get(model_type, {})
    kwargs |= overrides
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, StrictDataclassError):  # configs validate through huggingface_hub's dataclasses
        if "mlp_layer_types" in overrides or "mlp_layer_types" not in kwargs:
            raise
        del kwargs["mlp_layer_types"]  # this family names its layers otherwise: let the config derive the plan
        return cls(**kwargs)


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config of ``model_type`` (hand-made for FAMILIES, else generic); keyword arguments override any field."""
    if model_type not in _FAMILY:
        return generic_tiny_config(model_type, **overrides)
    kwargs = {**_BASE, **_FAMILY[model_type], **overrides}
    if model_type == "gpt_oss" and "layer_types" not in overrides:
        kwargs["layer_types"] = ["full_attention"] * kwargs["num_hidden_layers"]
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny random-weight causal LM of the family, in eval mode, with eager attention (deterministic on CPU)."""
    config = tiny_config(model_type, **overrides)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def byte_tokenizer():
    """A byte-level tokenizer with 256 byte tokens and 4 specials (vocabulary 260), built without training."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>", "<unk>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny(path: str | Path, model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """Write a tiny model directory (safetensors weights, config, tokenizer) and return its path."""
    path = Path(path)
    tok = byte_tokenizer()
    overrides.setdefault("vocab_size", 320)
    model = tiny_model(model_type, seed=seed, dtype=dtype, **overrides)
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# Supported model types whose tiny random model cannot be built or run from a generic config, and why.
UNTESTED: dict[str, str] = {
    "dots3_note": "its tiny config needs a vision tower as wide as its LM; the LM is tested as dots3_note_text",
}


def _matrix() -> tuple[str, ...]:
    return tuple(t for t in supported_model_types() if t not in UNTESTED)


# Every supported model type tested on a tiny random model (tests/test_families.py, scripts/families_table.py).
MATRIX = _matrix()
