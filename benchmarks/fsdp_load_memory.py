"""Per-rank memory of loading the frozen base with ``train.sharding: fsdp`` against ``none``, 2 ranks, one run.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fsdp_load_memory.py [--hidden 1024 --intermediate 1024
      --experts 16 --layers 4 --world 2]

Saves a random OLMoE-shaped fp32 model (840 MiB by default) to a temporary directory and launches itself under
``torchrun --nproc_per_node WORLD`` (gloo, CPU) twice: every rank loads it with ``perft_cli.modeling.load_model``,
whole (``none``: what DDP and one process do) or sharded (``fsdp``: transformers' FSDP2 loader, each rank reading
its shard of every weight). A thread samples the process's anonymous memory (``RssAnon``: what the load allocates;
the safetensors file's mapped pages are the page cache's, shared by the ranks) every ~1 ms; the peak above the
level before the load is printed per rank, with the ratio fsdp / none (the aim: ~1/world: no rank holds the whole
model at any time).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MiB = 2**20


def worker(model_dir: str, mode: str) -> None:
    """One rank: load, report ``mode rank peak_bytes model_bytes`` on stdout."""
    import torch.distributed as dist
    from real_width_cpu import Peak  # the same RssAnon sampler as the real-width benchmark

    dist.init_process_group("gloo")
    from perft_cli.config import ModelConfig
    from perft_cli.modeling import load_model

    with Peak() as peak:
        model, _ = load_model(ModelConfig(name_or_path=model_dir, dtype="float32"), shard=mode == "fsdp")
    full = sum(p.numel() * p.element_size() for p in model.parameters())  # DTensors count their global size
    print(f"RESULT {mode} {dist.get_rank()} {peak.peak - peak.base} {full}", flush=True)
    dist.destroy_process_group()


def launch(model_dir: str, mode: str, world: int) -> list[tuple[int, int, int]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    out = subprocess.run(
        [*cmd, __file__, "--worker", model_dir, mode], env=env, capture_output=True, text=True, check=False
    )
    rows = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if out.returncode or len(rows) != world:
        raise SystemExit(f"{mode} run failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return sorted((int(r), int(p), int(f)) for _, r, p, f in rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args()
    from perft_cli.tiny import save_tiny

    shape = dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_experts=args.experts,
        num_experts_per_tok=4,
        num_hidden_layers=args.layers,
        vocab_size=1024,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    with tempfile.TemporaryDirectory(prefix="perft-fsdp-load-") as tmp:
        model_dir = str(save_tiny(Path(tmp) / "model", "olmoe", **shape))
        none, fsdp = (launch(model_dir, mode, args.world) for mode in ("none", "fsdp"))
    print(f"olmoe {shape}, fp32, {args.world} ranks (gloo, CPU); model {none[0][2] / MiB:.0f} MiB")
    print(f"{'rank':<6}{'none MiB':>10}{'fsdp MiB':>10}{'ratio':>8}")
    for (rank, a, _), (_, b, _) in zip(none, fsdp, strict=True):
        print(f"{rank:<6}{a / MiB:>10.0f}{b / MiB:>10.0f}{b / a:>8.3f}")
    worst = max(b / a for (_, a, _), (_, b, _) in zip(none, fsdp, strict=True))
    print(f"peak anonymous memory of the load per rank, fsdp / none: {worst:.3f} (1/world = {1 / args.world:.3f})")


if __name__ == "__main__":
    main()
