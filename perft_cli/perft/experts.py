"""A bank of N PEFT experts stored as stacked parameters and computed without a Python loop over experts.

One PEFT expert maps D -> D through a bottleneck of width r (method.md, "The PEFT expert"):
- ``lora``:     Delta(h) = (alpha / r) * B A dropout(h)
- ``parallel``: Delta(h) = W2 silu(dropout(W1 h))
The bank holds all N down projections as ``perft_A [N, D, r]`` and all up projections as ``perft_B [N, r, D]``:
every expert's parameters take part in every step (DDP never sees an unused parameter, no ZeRO hang on an expert
that got no tokens), and two compute paths share them:

- ``dense``: all N bottlenecks in one matmul ``[T, D] @ [D, N*r]``, zeroed by the routing weights, then one up
  projection ``[T, N*r] @ [N*r, D]``. Cost grows with N*r, but it is two plain GEMMs.
- ``grouped``: the (token, expert) pairs sorted by expert and pushed through ``torch.nn.functional.grouped_mm``
  (what transformers uses for the base experts, forward and backward, CPU and CUDA). Cost grows with K*r, not N.

``auto`` picks dense while N*r <= ``DENSE_MAX_WIDTH`` and grouped beyond. Measured by benchmarks/adapter_overhead.py
(one PERFT-R layer alone after a few model steps, CPU, one thread, forward+backward, K=2, r=16), dense / grouped ms:

    tokens x width   N*r=32         64             128
    512 x 256        1.00 / 1.37    1.56 / 1.47    2.64 / 1.66
    4096 x 256       7.92 / 12.28   12.37 / 12.86  21.53 / 13.71
    2048 x 1024      15.39 / 24.31  23.78 / 24.96  40.33 / 26.18

Dense wins while the bank is narrow, because sorting and gathering the pairs costs a fixed amount per token; at
N*r=64 the two tie, from 128 grouped wins at every shape, and it grows slowly with N after that. (In a fresh
process, before the heap has grown, grouped pays more page faults for its temporaries.)

Dropout where method.md puts it: on the input of a ``lora`` expert (one mask per token, shared by the experts that
token visits, so both paths give identical results) and on the bottleneck ``W1 h`` of a ``parallel`` expert (one
mask per token and expert; the two paths then draw different masks of the same distribution).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from perft_cli.perft.frozen_experts import make_dispatch

DENSE_MAX_WIDTH = 64  # N * r up to which the dense masked path is used (see module docstring)
FORMS = ("lora", "parallel")


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [P, Din] sorted by group, w [G, Din, Dout], offs [G] int32 cumulative ends -> [P, Dout] in x's dtype.

    On CUDA the grouped GEMM runs in bf16 (its kernels take bf16; the fp32 master weights stay fp32). grouped_mm
    wants every row stride to be a multiple of 16 bytes (4 fp32 or 8 bf16 elements), on the CPU too, so a rank
    like 2, 6 or (bf16) 4 or 12 is zero-padded for the call: the padded columns of x and w multiply to nothing,
    the padded output columns are cut off, and autograd drops the padding's gradients. Exact, and a no-op for
    aligned shapes.
    """
    compute = torch.bfloat16 if x.is_cuda else x.dtype
    align = 16 // compute.itemsize
    d_in, d_out = w.shape[1], w.shape[2]
    pad_in, pad_out = -d_in % align, -d_out % align
    if pad_in:
        x = F.pad(x, (0, pad_in))  # [P, Din+]
    if pad_in or pad_out:
        w = F.pad(w, (0, pad_out, 0, pad_in))  # [G, Din+, Dout+]
    y = F.grouped_mm(x.to(compute), w.to(compute), offs=offs)  # [P, Dout+]
    return (y[:, :d_out] if pad_out else y).to(x.dtype)


class ExpertBank(nn.Module):
    """N PEFT experts of one form, rank r, on hidden size D, as stacked float32 parameters."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        rank: int,
        form: str = "lora",
        alpha: float | None = None,
        dropout: float = 0.0,
        init: str = "reference",
        impl: str = "auto",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown PEFT expert form {form!r}; expected one of {FORMS}")
        if impl not in ("auto", "dense", "grouped"):
            raise ValueError(f"unknown compute path {impl!r}; expected auto, dense or grouped")
        self.num_experts, self.hidden_size, self.rank = num_experts, hidden_size, rank
        self.form, self.impl = form, impl
        # lora scales by alpha / r (reference scripts: alpha = 2r); the parallel adapter has no scale.
        self.scale = (alpha if alpha is not None else 2 * rank) / rank if form == "lora" else 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(dtype=torch.float32, device=device)
        self.perft_A = nn.Parameter(torch.empty(num_experts, hidden_size, rank, **kw))  # [N, D, r]
        self.perft_B = nn.Parameter(torch.empty(num_experts, rank, hidden_size, **kw))  # [N, r, D]
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "reference") -> None:
        """Reference init: A ~ N(0, 2/r), B ~ N(0, 1e-6^2), so training starts at (almost) the frozen model.

        ``zero`` sets B = 0 exactly, for tests that need the attached model to equal the frozen one bit for bit.
        """
        if self.perft_A.is_meta:
            return
        self.perft_A.normal_(0.0, math.sqrt(2.0 / self.rank))
        if init == "zero":
            self.perft_B.zero_()
        elif init == "reference":
            self.perft_B.normal_(0.0, 1e-6)
        else:
            raise ValueError(f"unknown init {init!r}; expected reference or zero")

    def _input(self, h: torch.Tensor) -> torch.Tensor:
        """The experts' input in float32, with lora's input dropout: ``dropout(h)``."""
        x = h.to(self.perft_A.dtype)
        return self.dropout(x) if self.form == "lora" else x

    def _bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        """z = A h (or W1 h) -> what the up projection reads: ``(alpha / r) z`` or ``silu(dropout(z))``."""
        return F.silu(self.dropout(z)) if self.form == "parallel" else z * self.scale

    def use_dense(self) -> bool:
        if self.impl != "auto":
            return self.impl == "dense"
        return self.num_experts * self.rank <= DENSE_MAX_WIDTH

    def forward(
        self,
        h: torch.Tensor,
        index: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        dispatch=None,
    ) -> torch.Tensor:
        """sum over the chosen experts of weight * Delta_j(h).

        h: [T, D]. index, weights: [T, K] (routed), or both None for all N experts with weight 1 (PERFT-D/S).
        dispatch: these pairs already sorted by expert (frozen_experts.Dispatch of the same index), or None.
        Returns [T, D] in float32.
        """
        x = self._input(h)  # [T, D]
        if index is None or self.use_dense():
            return self._dense(x, index, weights)
        return self._grouped(x, index, weights, dispatch)

    def _dense(self, x: torch.Tensor, index: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor:
        T, (N, D, r) = x.shape[0], self.perft_A.shape
        z = x @ self.perft_A.permute(1, 0, 2).reshape(D, N * r)  # [T, N*r]
        z = self._bottleneck(z).view(T, N, r)  # [T, N, r]
        if index is not None:
            gate = torch.zeros(T, N, dtype=z.dtype, device=z.device).scatter(1, index, weights.to(z.dtype))  # [T, N]
            z = z * gate[:, :, None]  # [T, N, r]
        return z.reshape(T, N * r) @ self.perft_B.reshape(N * r, D)  # [T, D]

    def _grouped(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, dispatch=None) -> torch.Tensor:
        T, K = index.shape
        if dispatch is None or dispatch.offsets.numel() != self.num_experts:
            # The (token, slot) pairs sorted by expert, stably; PERFT-E is handed the frozen experts' own sort of
            # these very pairs instead (the same sort, done once for both).
            dispatch = make_dispatch(index, self.num_experts)
        order, offs, token = dispatch.perm, dispatch.offsets, dispatch.token  # [T*K], [N], [T*K]
        xs = x.index_select(0, token)  # [T*K, D] token rows in expert order
        # Each pair's routing weight multiplies its r-wide bottleneck, not its D-wide output (same product, D/r
        # times less work); it comes after the nonlinearity of the parallel form, so both forms stay exact.
        gate = weights.to(x.dtype).reshape(-1).index_select(0, order)[:, None]  # [T*K, 1]
        z = self._bottleneck(_grouped_mm(xs, self.perft_A, offs)) * gate  # [T*K, r]
        ys = _grouped_mm(z, self.perft_B, offs)  # [T*K, D]
        if not ys.is_cuda:
            # Each pair's output added into its token's row: one pass over [T*K, D], and its backward is a gather
            # (no [T*K, D] zeros + scatter). index_add_ on the CPU adds in index order, so it is deterministic.
            # Measured (one layer alone, 4096 tokens, width 1024, N=2): 74 ms against 118 ms for the gather below.
            return torch.zeros(T, ys.shape[1], dtype=ys.dtype, device=ys.device).index_add_(0, token, ys)
        # CUDA's index_add_ adds with atomics (run-to-run differences): back to (token, slot) order by a gather with
        # the inverse permutation, then a fixed-order sum over the K slots, deterministic.
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return ys.index_select(0, inverse).view(T, K, -1).sum(1)  # [T, D]

    def extra_repr(self) -> str:
        return f"N={self.num_experts}, D={self.hidden_size}, r={self.rank}, form={self.form}, impl={self.impl}"
