"""CPU runs: keep freed memory in the process instead of handing it back to the OS between steps.

glibc's malloc serves a block of more than 128 KiB to 32 MiB (its threshold moves) with mmap and returns it to
the OS on free, and trims the heap's free top as well. A training step on the CPU frees and re-allocates the same
activations every step, so every step page-faults them back in, zero-filled by the kernel: 15-40k minor faults a
step at the step_floor shape, 3-13% of the step in system time alone, and cold pages for every elementwise pass
(benchmarks/step_floor.py measures the effect). With a fixed mmap threshold of 64 MiB and no trimming, the freed
pages stay mapped and the next step reuses them: after the first steps a step faults almost never.

The cost is that the process keeps the memory of its peak until it exits, which is what a training or evaluation
process reaches every step anyway (PyTorch's CUDA caching allocator does the same on the GPU). Blocks over 64 MiB
are still mmapped and returned, and perft sets this only once the model is loaded, so the big temporaries of a
load (whole bf16 weights on their way to NF4, 117 MiB each at Mixtral's width) go back to the OS as before. perft
applies this only where the model computes on the CPU (no CUDA device), and leaves the allocator alone where the
user has chosen one: ``PERFT_CPU_ALLOCATOR=glibc``, any ``MALLOC_*`` tuning variable or a malloc tunable in
``GLIBC_TUNABLES``, or a preloaded jemalloc / tcmalloc / mimalloc.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "PERFT_CPU_ALLOCATOR"  # "glibc": leave glibc's malloc as it is
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap and are reused; above, mmapped as before
TRIM_THRESHOLD = 2**31 - 1  # the largest int: never trim the heap's free top
_USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: str | None = None  # what keep_freed_memory decided, once per process


def user_choice() -> str | None:
    """Why the allocator is the user's to leave alone, or None."""
    if os.environ.get(ENV, "").strip().lower() == "glibc":
        return f"{ENV}=glibc"
    for var in _USER_VARS:
        if var in os.environ:
            return var
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if name in preload:
            return f"LD_PRELOAD {name}"
    return None


def leave_reason() -> str | None:
    """Why keep_freed_memory would leave the allocator as it is (the user's choice, or not glibc), or None."""
    reason = user_choice()
    if reason is None and (platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"):
        reason = "not glibc"
    return reason


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep freed blocks below 64 MiB for reuse (see the module docstring); once per process.
    Returns what was done: "kept", "left: <the user's choice>" or "left: not glibc"."""
    global _state
    if _state is not None:
        return _state
    reason = leave_reason()
    if reason is not None:
        _state = f"left: {reason}"
    else:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        _state = "kept" if ok else "left: mallopt refused"
    return _state
