"""Forward+backward time of NF4 routed experts relative to bf16 experts, both through grouped_mm, in one run.

Run:  .venv/bin/python benchmarks/quant_experts.py
      [--tokens 512 --hidden 1024 --intermediate 512 --experts 16 --top-k 4 --threads 1 --device cuda --double-quant]

Builds one OLMoE-shaped experts module with frozen bf16 weights and a copy quantized with ``quantize_experts_``,
routes the same random tokens (hidden states requiring grad, as when adapters of earlier layers train), and times
forward+backward and forward-only (no grad) for each. The bf16 baseline runs the stock ``grouped_mm`` dispatch; NF4
runs ``perft_nf4``, which is that routine with each weight dequantized on the fly (twice in training: once in
forward, once in backward, since the dequantized weights are never saved).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def bench(fns: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each fn, interleaved (a, b, a, b, ...) so that load from other processes hits both alike."""
    for fn in fns.values():  # warm-up
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from perft_cli.arch import find_moe_blocks
    from perft_cli.quant import audit, quantize_experts_
    from perft_cli.tiny import tiny_model

    device = torch.device(args.device)
    bf16 = tiny_model(
        "olmoe",
        dtype=torch.bfloat16,
        num_hidden_layers=1,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    ).to(device)
    bf16.requires_grad_(False)
    nf4 = quantize_experts_(copy.deepcopy(bf16), double_quant=args.double_quant)
    experts = {name: find_moe_blocks(m)[0].experts for name, m in (("bf16", bf16), ("nf4", nf4))}

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=g, dtype=torch.bfloat16).to(device)  # [T, D]
    logits = torch.randn(args.tokens, args.experts, generator=g)  # [T, E]
    top_w, top_i = logits.softmax(-1).topk(args.top_k, dim=-1)  # [T, k]
    top_w, top_i = top_w.to(device, torch.bfloat16), top_i.to(device)
    grad_out = torch.randn(args.tokens, args.hidden, generator=g, dtype=torch.bfloat16).to(device)  # [T, D]

    def train_step(mod):
        def run():
            xi = x.detach().requires_grad_(True)
            mod(xi, top_i, top_w).backward(grad_out)

        return run

    def infer_step(mod):
        def run():
            with torch.no_grad():
                mod(x, top_i, top_w)

        return run

    train = bench({name: train_step(mod) for name, mod in experts.items()}, args.repeats, device)
    infer = bench({name: infer_step(mod) for name, mod in experts.items()}, args.repeats, device)

    a = audit(nf4, quantization="nf4")["routed_experts"]
    print(
        f"experts: {args.experts} x (hidden {args.hidden}, intermediate {args.intermediate}), top-{args.top_k}, "
        f"{args.tokens} tokens, {device.type}, {torch.get_num_threads()} threads; NF4 experts "
        f"{a['bytes'] / 2**20:.1f} MiB ({a['bytes_per_param']:.3f} B/param) vs bf16 {2 * a['params'] / 2**20:.1f} MiB"
    )
    for name in experts:
        print(
            f"{name:>4}: forward+backward {median(train[name]) * 1e3:8.2f} ms, "
            f"forward (no grad) {median(infer[name]) * 1e3:8.2f} ms  (medians of {args.repeats})"
        )
    # Median of the per-repeat ratios: each pair ran back to back under the same machine load.
    for label, t in (("forward+backward", train), ("forward (no grad)", infer)):
        ratio = median([q / b for q, b in zip(t["nf4"], t["bf16"], strict=True)])
        print(f"ratio nf4/bf16 {label}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
