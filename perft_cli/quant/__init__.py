"""A 4-bit backbone that is really 4-bit: NF4 Linear layers and NF4 fused routed experts, and the audit proving it.

With transformers 5, bitsandbytes quantizes only nn.Linear; the fused 3D routed experts (most of an MoE's weights)
stay bf16. This package quantizes them with bitsandbytes' functional API (blocksize 64, optional double
quantization), computes them through transformers' expert dispatch (``experts.py``), quantizes while loading
(``loader.py``: a transformers quantizer, see its docstring for why) and accounts every byte (``audit.py``).
"""

from perft_cli.quant.audit import GROUPS, QUANTIZATIONS, audit, check_audit, estimate_bytes
from perft_cli.quant.experts import IMPLEMENTATION, quantize_experts_
from perft_cli.quant.loader import load_model_nf4
from perft_cli.quant.nf4 import dequantize_nf4, disable_cpu_repack_, is_nf4, quantize_nf4

__all__ = [
    "GROUPS",
    "IMPLEMENTATION",
    "QUANTIZATIONS",
    "audit",
    "check_audit",
    "dequantize_nf4",
    "disable_cpu_repack_",
    "estimate_bytes",
    "is_nf4",
    "load_model_nf4",
    "quantize_experts_",
    "quantize_nf4",
]
