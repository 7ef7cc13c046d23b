"""perft_cli/allocator.py: on the CPU freed memory stays mapped for the next step, unless the user chose otherwise.

Each case runs in a fresh interpreter: the malloc setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from perft_cli.allocator import ENV, user_choice

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what it tunes"
)

# A 48 MiB tensor, above glibc's largest dynamic mmap threshold (32 MiB), made and freed as a step's activations
# are: glibc maps it afresh and page-faults it in every time, unless freed memory is kept. (Kept, the heap settles
# within a few rounds: PyTorch's 64-byte-aligned allocations leave small tails that tcache holds for a while.)
PROBE = """
import json, resource, sys
import torch
{setup}
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(12 * 1024 * 1024)  # 48 MiB, written
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"state": state, "faults": faults[-4:]}}))
"""


def _probe(setup: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != ENV and not k.startswith("MALLOC_")}
    code = PROBE.format(setup=textwrap.dedent(setup))
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


KEEP = "from perft_cli.allocator import keep_freed_memory\nstate = keep_freed_memory()"


def test_kept_memory_is_reused_without_page_faults():
    default = _probe("state = None")
    kept = _probe(KEEP)
    assert kept["state"] == "kept"
    assert min(default["faults"]) > 10_000  # 48 MiB / 4 KiB pages: glibc hands it back and faults it in again
    assert max(kept["faults"]) < 100  # the same pages, still mapped


def test_the_users_choice_is_left_alone():
    off = _probe(KEEP, **{ENV: "glibc"})
    assert off["state"] == f"left: {ENV}=glibc"
    assert min(off["faults"]) > 10_000
    tuned = _probe(KEEP, MALLOC_TRIM_THRESHOLD_="1000000")
    assert tuned["state"] == "left: MALLOC_TRIM_THRESHOLD_"


def test_user_choice_names_what_it_saw(monkeypatch):
    for var in (ENV, "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert user_choice() is None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert user_choice() == "GLIBC_TUNABLES"
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert user_choice() == "LD_PRELOAD jemalloc"


def test_load_model_keeps_freed_memory_on_a_cpu_machine(tiny_model_dir):
    model_dir = tiny_model_dir("olmoe")
    setup = f"""
    from perft_cli.allocator import keep_freed_memory
    from perft_cli.config import ModelConfig
    from perft_cli.modeling import load_model
    assert not torch.cuda.is_available()
    load_model(ModelConfig(name_or_path={str(model_dir)!r}))
    state = keep_freed_memory()  # what load_model decided, kept for the process
    """
    loaded = _probe(setup)
    assert loaded["state"] == "kept"
    assert max(loaded["faults"]) < 100
