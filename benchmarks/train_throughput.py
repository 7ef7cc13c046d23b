"""Training throughput of PERFT-R against the LoRA baseline at equal activated parameters, with `perft train`'s loop.

Run:  .venv/bin/python benchmarks/train_throughput.py [--steps 6] [--repeats 3] [--threads 2] [--rank 8]

Model: a tiny OLMoE-shaped MoE (hidden 256, intermediate 512, 4 layers, 16 experts top-4, vocab 1024) written to a
temporary directory and loaded like any checkpoint, fp32 on the CPU (bf16 autocast on a GPU). Data: random token
sequences, micro-batch 4 x 128 tokens, batch 8 (2 accumulated micro-batches). Each timed step is one full optimizer
step of the real loop (perft_cli.train: train_step, clip_gradients, apply_update, including both aux losses).
PERFT-R uses N=8 experts, top-2, rank r; the LoRA baseline (q_proj, v_proj) gets the rank whose activated parameter
count per token is closest to PERFT-R's (method.md accounting); both counts are printed. Timings are the median of
interleaved repeats; the last line is the tokens/s ratio PERFT-R / LoRA.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from perft_cli.tiny import BENCH_OLMOE

SHAPE = BENCH_OLMOE
MICRO, BATCH, SEQ = 4, 8, 128


def build(model_dir: Path, adapter: dict, run_dir: Path):
    """A ready-to-step training Run for ``adapter`` (same setup as ``perft train``) on random token data."""
    from accelerate import Accelerator

    from perft_cli.adapters import attach_adapter
    from perft_cli.config import recipe_from_dict
    from perft_cli.data import Examples
    from perft_cli.modeling import load_model, load_tokenizer
    from perft_cli.training.setup import schedule_length, setup_training
    from perft_cli.training.state import Position

    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": str(model_dir), "dtype": "float32"},
            "adapter": adapter,
            "train": {
                "lr": 1e-4,
                "batch_size": BATCH,
                "micro_batch_size": MICRO,
                "warmup_steps": 0,
                "max_steps": 10**6,
            },
            "output_dir": str(run_dir),
        }
    )
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, gradient_accumulation_steps=BATCH // MICRO)
    model, family = load_model(recipe.model)
    attached = attach_adapter(model, recipe.adapter, family)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (BATCH * 64, SEQ), generator=gen).tolist()  # 64 batches of random tokens
    data = Examples(ids, ids)
    schedule = schedule_length(recipe, len(data))
    run = setup_training(
        recipe, run_dir, accelerator, model, attached, load_tokenizer(recipe.model), data, data, schedule
    )
    return run, Position(data_seed=0)


def timed_steps(run, pos, steps: int) -> float:
    """Seconds per optimizer step over ``steps`` steps of the real loop body."""
    from perft_cli.training.collapse import CollapseWatch
    from perft_cli.training.step import apply_update, clip_gradients, next_micro_batches, train_step

    watch = CollapseWatch(run.attached.num_experts, run.attached.top_k, 0.9)
    start = time.perf_counter()
    for _ in range(steps):
        stats = train_step(run, next_micro_batches(run, pos), watch, {"stop": False})
        stats["grad_norm"] = clip_gradients(run)
        apply_update(run)
        pos.advance(run.steps_per_epoch)
        watch.end_step(pos.step)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def lora_rank_for(model_dir: Path, target: int, run_dir: Path) -> int:
    """The LoRA rank whose activated parameters per token are closest to ``target`` (linear in r)."""
    from perft_cli.adapters import accounting, attach_adapter
    from perft_cli.config import AdapterConfig
    from perft_cli.modeling import ModelConfig, load_config, meta_model

    config, family = load_config(ModelConfig(name_or_path=str(model_dir)))
    model = meta_model(config)
    cfg = AdapterConfig(variant="lora", rank=1)
    per_rank = accounting(model, attach_adapter(model, cfg, family))["activated_params"]
    return max(1, round(target / per_rank))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="PERFT-R rank r (N=8, K=2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from perft_cli.tiny import save_tiny

    with tempfile.TemporaryDirectory(prefix="perft-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = save_tiny(tmp / "model", "olmoe", **SHAPE)
        perft = {"variant": "perft-r", "num_experts": 8, "top_k": 2, "rank": args.rank}
        runs = {"perft-r": build(model_dir, perft, tmp / "r")}
        target = runs["perft-r"][0].accounting["activated_params"]
        lora = {"variant": "lora", "rank": lora_rank_for(model_dir, target, tmp / "l")}
        runs["lora"] = build(model_dir, lora, tmp / "l")
        times: dict[str, list[float]] = {name: [] for name in runs}
        for run, pos in runs.values():
            timed_steps(run, pos, 1)  # warm-up: first-call allocations, kernel selection
        for _ in range(args.repeats):
            for name, (run, pos) in runs.items():
                times[name].append(timed_steps(run, pos, args.steps))

    tokens = BATCH * SEQ
    device = "cuda" if torch.cuda.is_available() else f"cpu, {args.threads} threads"
    print(f"tiny OLMoE shape {SHAPE}, batch {BATCH} = {MICRO} x {BATCH // MICRO} accumulation, {SEQ} tokens, {device}")
    print(f"{'adapter':<28}{'trainable':>12}{'activated':>12}{'s/step':>10}{'tokens/s':>12}")
    speed = {}
    for name, (run, _) in runs.items():
        acc, t = run.accounting, statistics.median(times[name])
        label = f"perft-r N=8 K=2 r={args.rank}" if name == "perft-r" else f"lora q,v r={lora['rank']}"
        speed[name] = tokens / t
        print(
            f"{label:<28}{acc['trainable_params']:>12,}{acc['activated_params']:>12,}{t:>10.3f}{speed[name]:>12,.0f}"
        )
    print(f"tokens/s ratio perft-r / lora: {speed['perft-r'] / speed['lora']:.2f}")


if __name__ == "__main__":
    main()
