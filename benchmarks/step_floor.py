"""A training step's cost against its floor, for every variant, with the stock and perft's frozen experts path.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_floor.py [--repeats 5] [--hidden 1024] [--profile]

With the base frozen a step needs the forward plus the input-gradient backward (the floor, about 2x a forward),
plus the adapters' own cost. This prints, in one run, on an OLMoE-shaped random MoE (fp32 on the CPU, bf16
autocast on CUDA, as ``perft train`` runs it):

- per variant (frozen forward, floor = forward + backward to the input embeddings, PERFT-R N8 K2 r8, PERFT-E r8,
  PERFT-R at PERFT-E's size, PERFT-D N2 r8, PERFT-S r8, LoRA q,v r8): seconds per step under both experts paths
  (transformers' ``grouped_mm`` and perft's ``perft_frozen``, perft_cli/perft/frozen_experts.py), step / frozen
  forward, step / floor, and the stock / perft speed-up. A step is ``perft train``'s: LM loss + aux losses,
  backward, clipping, AdamW.
- PERFT-E / PERFT-R, against PERFT-R N8 K2 and against PERFT-R with PERFT-E's bank (N = E, K = k, r 8: equal
  activated adapter parameters; PERFT-E reuses the base experts' sort of the (token, expert) pairs).
- ``--profile``: where a PERFT-R step's time goes (torch.profiler, top operators, matmuls vs the rest).
- ``--layer-alone``: one PERFT-R layer alone at the paper's batch (16 x 256), N in 2..64: cost ratio N=64 / N=2
  against the activated-parameter ratio (method.md accounting).

Timings are medians of interleaved repeats (each variant alternates the two paths step by step, so machine noise
hits both alike). Run it on a quiet machine with one thread; the ratios, not the seconds, are what to compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_suite import Stepper, accelerator, sync  # noqa: E402 - perft train's step, as the GPU suite times it

from perft_cli.perft.frozen_experts import IMPLEMENTATION, select_frozen_experts  # noqa: E402
from perft_cli.tiny import tiny_model  # noqa: E402

PATHS = {"stock": "grouped_mm", "perft": IMPLEMENTATION}
ADAPTERS = {
    "perft-r": dict(variant="perft-r", num_experts=8, top_k=2, rank=8),
    "perft-e": dict(variant="perft-e", rank=8),
    # PERFT-R with PERFT-E's bank (N = E, K = k, r = 8): the same activated adapter parameters, plus its router
    "perft-r-e-size": dict(variant="perft-r", num_experts=None, top_k=None, rank=8),
    "perft-d": dict(variant="perft-d", num_experts=2, rank=8),
    "perft-s": dict(variant="perft-s", rank=8),
    "lora": dict(variant="lora", rank=8),
}
ROWS = ("frozen-forward", "floor", *ADAPTERS)


def build_model(args, device: torch.device):
    shape = dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        vocab_size=args.vocab,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = tiny_model("olmoe", seed=0, dtype=dtype, **shape).to(device)
    model.requires_grad_(False)
    return model, shape


def set_path(model, path: str) -> None:
    select_frozen_experts(model, PATHS[path])


def clock(device: torch.device) -> float:
    """Wall time on CUDA; on the CPU this process's CPU time, which other processes on a shared machine barely
    disturb (wall time there measured the neighbours: a 2-core machine with 4 busy processes doubled it)."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def interleaved(model, fn, device, repeats: int) -> dict[str, float]:
    """Median seconds of ``fn`` under each experts path, the paths alternating call by call (one warm-up each)."""
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    for r in range(repeats + 1):
        for path in PATHS if r % 2 == 0 else reversed(PATHS):
            set_path(model, path)
            sync(device)
            t0 = clock(device)
            fn()
            sync(device)
            if r:
                times[path].append(clock(device) - t0)
    set_path(model, "perft")
    return {p: statistics.median(t) for p, t in times.items()}


def row_fn(name: str, model, batch, acc, device):
    """(the callable to time, a cleanup) for one row of the table."""
    from perft_cli.adapters import attach_adapter, detach_adapter
    from perft_cli.arch import family_for
    from perft_cli.config import AdapterConfig

    ids, mask = batch["input_ids"], batch["attention_mask"]
    if name == "frozen-forward":

        def forward():
            with torch.no_grad(), acc.autocast():
                model(input_ids=ids, attention_mask=mask)

        return forward, lambda: None
    if name == "floor":
        embed = model.get_input_embeddings()

        def floor():
            x = embed(ids).detach().requires_grad_()  # [B, S, D]: the gradient an adapter in layer 0 needs
            with acc.autocast():
                logits = model(inputs_embeds=x, attention_mask=mask).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten()).backward()

        return floor, lambda: None
    torch.manual_seed(1)
    adapter = dict(ADAPTERS[name])
    if adapter.get("num_experts", 0) is None:  # the base's E and k
        adapter.update(num_experts=model.config.num_experts, top_k=model.config.num_experts_per_tok)
    attached = attach_adapter(model, AdapterConfig(**adapter), family_for(model.config.model_type))
    model.train()
    stepper = Stepper(model, attached, SimpleNamespace(device=device))

    def cleanup():
        model.eval()
        detach_adapter(model, name)
        model.requires_grad_(False)

    return (lambda: stepper.step(batch)), cleanup


def measure(args, device) -> dict:
    model, shape = build_model(args, device)
    acc = accelerator(SimpleNamespace(device=device))  # bf16 autocast on CUDA, none on the CPU
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)  # [B, S]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    rows = {}
    for name in ROWS:
        fn, cleanup = row_fn(name, model, batch, acc, device)
        try:
            rows[name] = interleaved(model, fn, device, args.repeats)
        finally:
            cleanup()
        print(f"  {name:<15} stock {rows[name]['stock']:.3f} s   perft {rows[name]['perft']:.3f} s", flush=True)
    result = {"shape": shape, "batch": [args.batch, args.seq], "device": str(device), "rows": rows}
    for path in PATHS:
        fwd, floor = rows["frozen-forward"][path], rows["floor"][path]
        result[path] = {
            name: {"over_forward": rows[name][path] / fwd, "over_floor": rows[name][path] / floor} for name in ROWS[1:]
        }
    result["speedup"] = {name: rows[name]["stock"] / rows[name]["perft"] for name in ROWS}
    result["perft_e_over_perft_r"] = {p: rows["perft-e"][p] / rows["perft-r"][p] for p in PATHS}
    result["perft_e_over_perft_r_e_size"] = {p: rows["perft-e"][p] / rows["perft-r-e-size"][p] for p in PATHS}
    if args.profile:
        result["profile"] = profile_perft_r(model, batch, acc, device)
    return result


def profile_perft_r(model, batch, acc, device) -> dict:
    """Self time of a PERFT-R step's operators (perft path): the matmuls against everything else."""
    from torch.profiler import ProfilerActivity, profile

    fn, cleanup = row_fn("perft-r", model, batch, acc, device)
    try:
        fn()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            fn()
    finally:
        cleanup()
    events = prof.key_averages()
    self_us = {e.key: e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total for e in events}
    total = sum(self_us.values())
    matmul = sum(v for k, v in self_us.items() if k in ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm"))
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:15]
    return {
        "total_ms": total / 1e3,
        "matmul_share": matmul / total,
        "top": [{"op": k, "ms": v / 1e3, "share": v / total} for k, v in top],
    }


def layer_alone_table(args, device) -> dict:
    from adapter_overhead import layer_alone

    ns = (2, 8, 32, 64)
    ms, act = layer_alone(ns, 2, 8, 16 * 256, args.hidden, device, args.layer_repeats, impls=("auto",))
    return {
        "tokens": 16 * 256,
        "hidden": args.hidden,
        "ms": {str(n): ms[n, "auto"] for n in ns},
        "activated_params": {str(n): act[n] for n in ns},
        "cost_ratio_n64_n2": ms[64, "auto"] / ms[2, "auto"],
        "activated_ratio_n64_n2": act[64] / act[2],
    }


def report(result: dict) -> None:
    print(f"\nOLMoE-shaped {result['shape']}, batch {result['batch']}, {result['device']}")
    print(f"{'row':<15}{'stock s':>9}{'perft s':>9}{'speed-up':>10}{'/fwd':>7}{'/floor':>8}{'stock /fwd':>12}")
    for name in ROWS:
        r = result["rows"][name]
        over = result["perft"].get(name, {})
        stock_over = result["stock"].get(name, {})
        print(
            f"{name:<15}{r['stock']:>9.3f}{r['perft']:>9.3f}{result['speedup'][name]:>9.2f}x"
            + (
                f"{over['over_forward']:>7.2f}{over['over_floor']:>8.2f}{stock_over['over_forward']:>12.2f}"
                if over
                else ""
            )
        )
    e, same = result["perft_e_over_perft_r"], result["perft_e_over_perft_r_e_size"]
    print(f"PERFT-E / PERFT-R (N8 K2) step: perft path {e['perft']:.3f}, stock path {e['stock']:.3f}")
    print(
        f"PERFT-E / PERFT-R at PERFT-E's size (N=E, K=k, r8: equal activated adapter parameters): perft path "
        f"{same['perft']:.3f}, stock path {same['stock']:.3f} (target <= 1.1)"
    )
    slower = [n for n in ROWS[2:] if result["speedup"][n] < 1.0]
    print("every variant faster on the perft path:", "yes" if not slower else f"no ({', '.join(slower)})")
    if "profile" in result:
        p = result["profile"]
        print(f"\nPERFT-R step profile (perft path): {p['total_ms']:.0f} ms, matmuls {p['matmul_share']:.0%}")
        for row in p["top"]:
            print(f"  {row['op']:<48}{row['ms']:>9.1f} ms {row['share']:>6.1%}")
    if "layer_alone" in result:
        la = result["layer_alone"]
        print(f"\nPERFT-R layer alone, {la['tokens']} tokens x {la['hidden']}, K=2 r=8 (ms): {la['ms']}")
        print(
            f"cost N=64/N=2 {la['cost_ratio_n64_n2']:.2f} vs activated params {la['activated_ratio_n64_n2']:.2f}: "
            f"{la['cost_ratio_n64_n2'] / la['activated_ratio_n64_n2']:.2f}x (target <= 1.2x)"
        )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true", help="profile one PERFT-R step (perft path)")
    ap.add_argument("--layer-alone", action="store_true", help="PERFT-R layer alone at 16 x 256, N in 2..64")
    ap.add_argument("--layer-repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = measure(args, device)
    if args.layer_alone:
        result["layer_alone"] = layer_alone_table(args, device)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
