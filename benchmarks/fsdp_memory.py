"""Per-rank peak memory of the frozen base under ``train.sharding: fsdp`` against ``none``, 2 ranks, one run.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fsdp_memory.py [--quantization nf4] [--family mixtral]
      [--hidden 256 --intermediate 512 --experts 16 --layers 4 --world 2]

Saves a random OLMoE-shaped bf16 model (by default the widths of platform.md's CPU reference shape) to a temporary
directory and launches itself under ``torchrun --nproc_per_node WORLD`` (gloo, CPU). Every rank loads it with perft's
loader (``model.quantization`` as given), attaches a PERFT-R adapter and runs one forward + backward twice: first as
``none`` (the whole base on every rank, as DDP holds it), then after ``training/sharding.shard_model`` (FSDP2). A
dispatch mode samples, after every op of both steps, the bytes of the frozen base's tensors alive on this rank: for
``fsdp`` its local shards, the units all-gathered at that moment, and what stays replicated (the NF4 weights); the
maximum is the peak. It counts tensor storage, not RSS: the CPU allocator keeps freed pages, and the load would mask
the training peak (benchmarks/fsdp_load_memory.py measures the load). Activations, the adapter and its optimizer state
are the same in both modes and not counted. Prints one table and the ratio fsdp / none (the aim: ~1/world).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 2**20


def frozen_tensors(model):
    """(tensor, kind) for every frozen-base tensor this rank holds now; kind: sharded / gathered / replicated."""
    from torch.distributed.fsdp import FSDPModule

    seen = set()
    for m in model.modules():
        group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
        for fp in group.fsdp_params if group else ():
            seen.add(id(fp.sharded_param))
            yield fp._sharded_param_data, "sharded"
            for t in getattr(fp, "all_gather_outputs", None) or ():
                yield t, "gathered"
    for p in model.parameters():
        if not p.requires_grad and id(p) not in seen:
            yield p, "replicated"


def held_bytes(model) -> dict[str, int]:
    """Bytes of the frozen base alive on this rank, by kind (storages counted once; freed ones have size 0)."""
    out, ptrs = {"sharded": 0, "gathered": 0, "replicated": 0}, set()
    for t, kind in frozen_tensors(model):
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in ptrs:
            ptrs.add(storage.data_ptr())
            out[kind] += storage.nbytes()
    return out


def peak_of_step(model, batch) -> dict[str, int]:
    """One forward + backward; the peak (by total) of ``held_bytes`` sampled after every op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    peak = {"total": 0}

    class Sampler(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            now = held_bytes(model)  # reads storage sizes only: no op dispatched, no recursion
            if sum(now.values()) > peak["total"]:
                peak.update(now, total=sum(now.values()))
            return result

    with Sampler():
        out = model(input_ids=batch, attention_mask=batch.new_ones(batch.shape))
        out.logits.float().pow(2).mean().backward()
    return peak


def worker(model_dir: str, quantization: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from perft_cli.adapters import attach_adapter
    from perft_cli.config import AdapterConfig, ModelConfig
    from perft_cli.modeling import load_model
    from perft_cli.training.sharding import shard_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model, family = load_model(ModelConfig(name_or_path=model_dir, dtype="bfloat16", quantization=quantization))
    attach_adapter(model, AdapterConfig(variant="perft-r", num_experts=4, top_k=2, rank=8, dropout=0.0), family)
    batch = torch.randint(0, 256, (2, 64))  # [B, S]
    none = peak_of_step(model, batch)
    for p in model.parameters():
        p.grad = None
    shard_model(model, torch.device("cpu"))
    fsdp = peak_of_step(model, batch)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "none": none, "fsdp": fsdp}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="olmoe")
    ap.add_argument("--quantization", choices=("none", "nf4"), default="none")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--worker", nargs=3, metavar=("MODEL_DIR", "QUANTIZATION", "OUT_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)

    import torch

    from perft_cli.tiny import save_tiny

    experts = {"mixtral": "num_local_experts"}.get(args.family, "num_experts")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny(
            Path(tmp, "model"),
            args.family,
            dtype=torch.bfloat16,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            vocab_size=1024,
            **{experts: args.experts},
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.world)]
        worker_args = ["--worker", str(model_dir), args.quantization, tmp]
        subprocess.run([*launch, __file__, *worker_args], check=True, env=env, stdout=subprocess.DEVNULL)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]

    print(
        f"{args.family}, hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts, "
        f"{args.layers} layers, bf16 base, quantization {args.quantization}, {args.world} ranks (gloo, CPU)"
    )
    header = ("rank", "none MiB", "fsdp MiB", "sharded", "gathered", "replicated", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (4, 9, 9, 8, 9, 10, 6), strict=True)))
    for r in ranks:
        none, fsdp = r["none"]["total"], r["fsdp"]
        print(
            f"{r['rank']:>4} {none / MiB:>9.2f} {fsdp['total'] / MiB:>9.2f} {fsdp['sharded'] / MiB:>8.2f} "
            f"{fsdp['gathered'] / MiB:>9.2f} {fsdp['replicated'] / MiB:>10.2f} {fsdp['total'] / none:>6.3f}"
        )
    worst = max(r["fsdp"]["total"] / r["none"]["total"] for r in ranks)
    print(f"peak frozen-base memory per rank, fsdp / none: {worst:.3f} (1/world = {1 / args.world:.3f})")


if __name__ == "__main__":
    main()
