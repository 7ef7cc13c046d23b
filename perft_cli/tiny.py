"""Tiny random-weight MoE models of every supported family, for tests, benchmarks and smoke runs.

No weights are downloaded: each model is built from a transformers config. ``save_tiny`` writes a model directory
(safetensors + config + a byte-level tokenizer) that the real loading code reads like any hub checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

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


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config of the family ``model_type`` (see FAMILIES); keyword arguments override any field."""
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
