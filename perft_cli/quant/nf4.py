"""NF4 storage for tensors of any shape: bitsandbytes' functional API, a few experts at a time.

bitsandbytes' ``quantize_4bit`` works on any floating tensor and returns packed uint8 ``[(numel + 1) // 2, 1]`` plus a
``QuantState`` that keeps the logical shape. We wrap the result in ``bnb.nn.Params4bit`` (a frozen ``nn.Parameter``
that carries its QuantState): ``module.to(device)``, ``deepcopy`` and ``state_dict`` then work as for ``Linear4bit``.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.nn import Linear4bit, Params4bit
from torch import nn

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit; 0.5625 B/param (0.516 with double quantization)
QUANT_TYPE = "nf4"
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax of double quantization in blocks of 256
# CPU quantization allocates ~16 B/element of fp32 temporaries (shared/docs/platform.md): quantizing a layer's fused
# experts in one call costs 8x its bf16 size in RAM. 1M weights per call keeps that near 20 MiB (a multiple of 64).
CHUNK_ELEMENTS = 1 << 20


def is_nf4(t: torch.Tensor | None) -> bool:
    """True for a packed 4-bit parameter (ours or a quantized Linear4bit weight)."""
    return isinstance(t, Params4bit) and t.bnb_quantized and t.quant_state is not None


def quantize_nf4(
    w: torch.Tensor, *, double_quant: bool = False, compute_dtype: torch.dtype = torch.bfloat16
) -> Params4bit:
    """``w`` (any shape, float) as a frozen NF4 ``Params4bit`` that dequantizes to ``compute_dtype``.

    bitsandbytes quantizes the flattened tensor in consecutive blocks of 64, so we quantize the flat tensor in slices
    of CHUNK_ELEMENTS (a multiple of 64) to bound the CPU temporaries: the packed bytes and absmax are bit-identical
    to one ``quantize_4bit`` call on the whole tensor. Double quantization then runs once on the concatenated absmax,
    exactly as ``quantize_4bit(compress_statistics=True)`` does.
    """
    flat = w.detach().contiguous().view(-1)  # [numel], storage order = bitsandbytes' block order
    packed, absmax = [], []
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        p, s = bnbf.quantize_4bit(flat[start : start + CHUNK_ELEMENTS], blocksize=BLOCKSIZE, quant_type=QUANT_TYPE)
        packed.append(p)  # [n_i / 2, 1] uint8
        absmax.append(s.absmax)  # [n_i / 64] fp32
    packed_t = torch.cat(packed) if len(packed) > 1 else packed[0]  # [numel / 2, 1]
    absmax_t = torch.cat(absmax) if len(absmax) > 1 else absmax[0]  # [numel / 64]
    del packed, absmax
    code = bnbf.get_4bit_type(QUANT_TYPE, device=w.device)
    if double_quant:
        offset = absmax_t.mean()
        qabsmax, state2 = bnbf.quantize_blockwise(absmax_t - offset, blocksize=NESTED_BLOCKSIZE)
        state = bnbf.QuantState(
            absmax=qabsmax,
            shape=w.shape,
            dtype=compute_dtype,
            blocksize=BLOCKSIZE,
            code=code,
            quant_type=QUANT_TYPE,
            offset=offset,
            state2=state2,
        )
    else:
        state = bnbf.QuantState(
            absmax=absmax_t, shape=w.shape, dtype=compute_dtype, blocksize=BLOCKSIZE, code=code, quant_type=QUANT_TYPE
        )
    return Params4bit(
        packed_t,
        requires_grad=False,
        quant_state=state,
        blocksize=BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type=QUANT_TYPE,
        quant_storage=torch.uint8,
        bnb_quantized=True,
    )


def dequantize_nf4(p: Params4bit) -> torch.Tensor:
    """The logical tensor of a packed parameter, in its compute dtype (a new allocation each call)."""
    return bnbf.dequantize_4bit(p.data, p.quant_state)


def packed_bytes(p: Params4bit) -> int:
    """Bytes a packed parameter holds: 4-bit data, absmax, code table and the nested state of double quantization."""
    qs = p.quant_state
    tensors = [p.data, qs.absmax, qs.code]
    if qs.nested:
        tensors += [qs.offset, qs.state2.absmax, qs.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors)


def logical_numel(p: torch.Tensor) -> int:
    """Number of weights a parameter stands for (the unpacked count for a 4-bit one)."""
    return int(torch.Size(p.quant_state.shape).numel()) if is_nf4(p) else p.numel()


def disable_cpu_repack_(model: nn.Module) -> int:
    """Switch off bitsandbytes' AVX512-BF16 weight repack on every Linear4bit; returns how many were touched.

    On CPUs with AVX512-BF16 a Linear4bit forward in eval mode without grad repacks its weight in place; the repack
    crashes for out_features not divisible by 32 or in_features < 64, and afterwards training backpropagates through
    a kernel without autograd support (silently wrong input gradients). See shared/docs/platform.md.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n
