"""Load a checkpoint with every Linear and the fused routed experts in NF4, quantizing each tensor as it is read.

Design: a transformers quantizer, not our own shard streamer. ``_PerftNF4Quantizer`` subclasses bitsandbytes'
``Bnb4BitHfQuantizer`` (which turns nn.Linear into Linear4bit) and also claims the fused expert weights: transformers
5 reads one checkpoint tensor group at a time, applies the model's own conversion (per-expert ``w1/w3`` ->
``experts.gate_up_proj [E, 2I, H]``, gpt-oss transposes, renamings), then hands the fused 3D tensor of one layer to
our op, which quantizes it and drops the bf16 copy before the next tensor is read (with on-the-fly quantization
transformers loads synchronously for exactly this reason). So peak memory is the quantized model plus one layer's
largest projection in bf16 (twice that while transformers concatenates gate and up), a constant: the peak grows by
1.0x the NF4 size per layer (benchmarks/quant_load_memory.py). And we reuse transformers' per-family key conversions,
sharded checkpoints, device_map placement and tied weights instead of re-implementing them for every family. The
price is coupling to transformers' quantizer hooks (pinned major version; tests load every family through them).
"""

from __future__ import annotations

import ctypes
import re
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel
from transformers.integrations.bitsandbytes import Bnb4bitQuantize
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from perft_cli.arch import family_for
from perft_cli.errors import ModelError
from perft_cli.quant.audit import quant_plan
from perft_cli.quant.experts import select_nf4_experts
from perft_cli.quant.nf4 import QUANT_TYPE, disable_cpu_repack_, quantize_nf4

QUANT_METHOD = "perft_nf4"


class PerftNF4Config(BitsAndBytesConfig):
    """BitsAndBytesConfig for NF4 Linear layers, tagged so that transformers picks ``_PerftNF4Quantizer``."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("quant_method", None)
        super().__init__(*args, **kwargs)
        self.quant_method = QUANT_METHOD


try:
    _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
except OSError:  # musl or another libc without malloc_trim
    _LIBC = None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc only).

    glibc serves the multi-MiB per-expert tensors from its heap once its dynamic mmap threshold has grown, and keeps
    the freed pages: without this, RSS after an NF4 load still grows by the bf16 size per layer although the live
    tensors are 4-bit (measured with benchmarks/quant_load_memory.py).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class _NF4Quantize(Bnb4bitQuantize):
    """Quantize one loaded tensor: fused experts with the functional API, Linear weights as bitsandbytes does."""

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        result = {}
        for name in list(input_dict):
            value = input_dict.pop(name)  # drop the caller's reference too, so the bf16 tensor dies here
            value = value[0] if isinstance(value, list) else value
            if name in self.hf_quantizer.expert_weights:
                cfg = self.hf_quantizer.quantization_config
                on_cpu = value.device.type == "cpu"
                result[name] = quantize_nf4(
                    value, double_quant=cfg.bnb_4bit_use_double_quant, compute_dtype=cfg.bnb_4bit_compute_dtype
                )
                del value  # one layer's bf16 projection is gone before the next tensor is read
                if on_cpu:
                    _trim_heap()
                get_module_from_name(model, name)[0]._is_hf_initialized = True
            else:
                result.update(super().convert({name: value}, full_layer_name=full_layer_name, model=model, **kwargs))
        return result


class _PerftNF4Quantizer(Bnb4BitHfQuantizer):
    """Bitsandbytes' 4-bit quantizer that also quantizes the fused routed experts (and skips what should stay)."""

    expert_weights: frozenset[str] = frozenset()

    def _process_model_before_weight_loading(self, model, device_map, **kwargs):
        plan = quant_plan(model)  # the model is still on the meta device here
        self.expert_weights = frozenset(plan.expert_weights)
        # Exact module names (escaped: transformers matches them as regexes): lm_head, routers, tiny Linear layers.
        self.quantization_config.llm_int8_skip_modules = [re.escape(n) for n in plan.skip_linears]
        super()._process_model_before_weight_loading(model, device_map, **kwargs)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return param_name in self.expert_weights or super().param_needs_quantization(model, param_name, **kwargs)

    def get_quantize_ops(self):
        return _NF4Quantize(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        model = super()._process_model_after_weight_loading(model, **kwargs)
        disable_cpu_repack_(model)
        select_nf4_experts(model)
        return model

    def is_serializable(self):
        return False  # the packed experts have no checkpoint format that transformers could read back


def _register() -> None:
    # Registration is process-global and raises on a second call (e.g. a module reload in tests).
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(PerftNF4Config)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(_PerftNF4Quantizer)


_register()


def nf4_config(*, double_quant: bool = False, compute_dtype: torch.dtype = torch.bfloat16) -> PerftNF4Config:
    """The quantization config ``load_model_nf4`` passes to ``from_pretrained``."""
    return PerftNF4Config(
        load_in_4bit=True,
        bnb_4bit_quant_type=QUANT_TYPE,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage=torch.uint8,
        # llm_int8_skip_modules is filled per model in _process_model_before_weight_loading.
    )


def load_model_nf4(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = False,
    device_map=None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """Load a causal MoE LM (local dir or hub id, safetensors only) with Linear layers and routed experts in NF4.

    Routers, embeddings, lm_head, norms and tiny Linear layers stay unquantized in ``dtype`` (or in float32 where the
    model class keeps them so, e.g. DeepSeek's router: ``audit.fp32_kept``); NF4 weights compute in ``dtype``.
    ``device_map`` defaults to the first CUDA device, else CPU. Raises ModelError for unsupported or pre-quantized
    checkpoints.
    """
    kwargs = {} if revision is None else {"revision": revision}
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config of {name_or_path!r}: {str(e).splitlines()[0]}") from e
    family_for(getattr(config, "model_type", None))
    existing = getattr(config, "quantization_config", None)
    if existing:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", "")
        raise ModelError(
            f"{name_or_path!r} is already quantized ({method}); NF4 loading needs a bf16/fp32 checkpoint "
            "(use quantization: none, or a dequantized copy of the model)"
        )
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            config=config,
            dtype=dtype,
            quantization_config=nf4_config(double_quant=double_quant, compute_dtype=dtype),
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            **kwargs,
        )
    except OSError as e:
        raise ModelError(f"cannot load safetensors weights of {name_or_path!r}: {str(e).splitlines()[0]}") from e
    return model
