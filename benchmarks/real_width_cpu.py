"""Real width on the CPU: two Mixtral-8x7B layers at full width, written to disk in bf16 and loaded in NF4.

Run:  OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_width_cpu.py [--layers 2] [--tokens 128] [--keep DIR]

Saves a random bf16 checkpoint of Mixtral-8x7B's shape (hidden 4096, intermediate 14336, 8 experts top-2, vocab
32000) with two decoder layers (~6.2 GB), then, in a fresh process, loads it with ``model.quantization: nf4`` the way
``perft train`` does (``load_model_nf4``) and reports: the NF4 audit (bytes per routed-expert weight), the load's peak
anonymous RSS against ``perft plan``'s weight estimate for the same folder, one PERFT-R training step (N=4, K=2,
r=8; forward + backward, as perft train runs it on the CPU) timed against the frozen model's forward on the same
tokens, and the step's peak RSS against plan's total. Ratios are within this one run (the machine is noisy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import quant_load_memory  # noqa: E402 - benchmarks/ is this script's folder, hence on sys.path

MiB = 2**20
SHAPE = dict(
    hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
)  # fmt: skip


def _kib(field: str) -> int:
    return quant_load_memory._status_kib(field)  # noqa: SLF001 - the same /proc reader as the load benchmark


class Peak:
    """The peak RssAnon (bytes) while the block runs, sampled by a thread every ~1 ms."""

    def __enter__(self):
        self.base = self.peak = _kib("RssAnon") * 1024
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, _kib("RssAnon") * 1024)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, _kib("RssAnon") * 1024)


def write_checkpoint(folder: Path, layers: int) -> float:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from perft_cli.tiny import byte_tokenizer

    config = AutoConfig.for_model("mixtral", num_hidden_layers=layers, **SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def child(folder: str, tokens: int) -> None:
    """Load in NF4, audit, time a PERFT-R step against the frozen forward; print one JSON line."""
    import torch

    from perft_cli.adapters import attach_adapter
    from perft_cli.config import recipe_from_dict
    from perft_cli.modeling import load_model
    from perft_cli.plan import run_plan
    from perft_cli.quant import audit
    from perft_cli.training.setup import enable_checkpointing

    raw = {
        "model": {"name_or_path": folder, "quantization": "nf4", "dtype": "bfloat16"},
        "adapter": {"variant": "perft-r", "num_experts": 4, "top_k": 2, "rank": 8},
        "data": {"cutoff_len": tokens},
        "train": {"batch_size": 1, "micro_batch_size": 1, "gradient_checkpointing": True},
        "output_dir": "unused",
    }
    recipe = recipe_from_dict(raw)
    plan = run_plan(recipe)["memory"]
    before = _kib("RssAnon") * 1024
    with Peak() as load:
        model, family = load_model(recipe.model)
    a = audit(model, quantization="nf4")
    ids = torch.randint(0, SHAPE["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)  # warm-up (first-call allocations)
        t = time.perf_counter()
        model(ids)
        forward_s = time.perf_counter() - t
    attach_adapter(model, recipe.adapter, family)
    model.train()
    enable_checkpointing(model)
    model(ids, labels=ids).loss.backward()  # warm-up step
    model.zero_grad(set_to_none=True)
    with Peak() as step:
        t = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        step_s = time.perf_counter() - t
    print(
        json.dumps(
            {
                "tokens": tokens,
                "routed_experts_bytes_per_param": a["routed_experts"]["bytes_per_param"],
                "audit_total_bytes": a["total_bytes"],
                "load_peak_increment_bytes": load.peak - before,
                "plan_weights_bytes": plan["weights_bytes"],
                "plan_load_peak_bytes": plan["load_peak_bytes"],
                "plan_nf4_dequant_bytes": plan["nf4_dequant_bytes"],
                "plan_total_bytes": plan["total_bytes"],
                "step_peak_bytes": step.peak - before,
                "frozen_forward_s": forward_s,
                "perft_r_step_s": step_s,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--keep", type=Path, help="write (or reuse) the checkpoint here instead of a temporary folder")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.tokens)
    with tempfile.TemporaryDirectory(prefix="perft-real-width-") as tmp:
        folder = args.keep or Path(tmp) / "mixtral-2l"
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            gib = write_checkpoint(folder, args.layers)
            print(f"wrote {folder}: {gib:.2f} GiB of bf16 weights in {time.perf_counter() - t:.0f} s", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(folder), "--tokens", str(args.tokens)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
    load, plan_w = r["load_peak_increment_bytes"], r["plan_weights_bytes"]
    print(f"Mixtral-8x7B width, {args.layers} layers, NF4 (model.quantization: nf4), {r['tokens']} tokens")
    audit_mib = r["audit_total_bytes"] / MiB
    print(f"routed experts: {r['routed_experts_bytes_per_param']:.4f} bytes/param; audit total {audit_mib:,.0f} MiB")
    print(f"load peak (anon RSS increment) {load / MiB:,.0f} MiB vs plan's weights {plan_w / MiB:,.0f} MiB: ", end="")
    print(f"{load / plan_w:.3f}x; vs plan's load peak {r['plan_load_peak_bytes'] / MiB:,.0f} MiB: ", end="")
    print(f"{load / r['plan_load_peak_bytes']:.3f}x")
    print(
        f"PERFT-R step (checkpointing) peak {r['step_peak_bytes'] / MiB:,.0f} MiB vs plan's total "
        f"{r['plan_total_bytes'] / MiB:,.0f} MiB (incl. {r['plan_nf4_dequant_bytes'] / MiB:,.0f} MiB dequantized): "
        f"{r['step_peak_bytes'] / r['plan_total_bytes']:.3f}x"
    )
    print(
        f"frozen forward {r['frozen_forward_s']:.2f} s, PERFT-R step {r['perft_r_step_s']:.2f} s: "
        f"step / forward {r['perft_r_step_s'] / r['frozen_forward_s']:.2f}"
    )


if __name__ == "__main__":
    main()
