"""Forward+backward cost of PERFT adapters against the frozen base and a per-expert Python loop, in one run.

Run:  .venv/bin/python benchmarks/adapter_overhead.py [--repeats 7] [--threads 2] [--ranks 4,8,16,32]

Model: a tiny OLMoE-shaped MoE (hidden 256, intermediate 512, 4 layers, 16 experts top-4, vocab 1024), batch
4 x 128 tokens by default (--batch/--seq; the paper's reference batch is 16 x 256), fp32 on the CPU.
Each timing is the median of interleaved repeats of one training step's
forward + backward (the base alone: gradient with respect to the input embeddings, so the backward pass is as long
as with adapters). "overhead" = step time - base step time. Printed ratios are the targets of the core issue:
at equal K and r, overhead(N=64) / overhead(N=2) <= 1.5, and the stacked bank beats the per-expert loop for N >= 8.
Then one PERFT-R layer timed alone (auto, grouped, loop), optionally a rank sweep (--ranks), the dense and grouped
compute paths of the stacked bank layer alone (what DENSE_MAX_WIDTH is set from), and PERFT-E on a 64-expert top-8
model (full step, then one layer alone). At the reference batch the full-step overheads drown in the base step's
run-to-run noise; the layer-alone tables are the steady ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

from perft_cli.arch import find_moe_blocks
from perft_cli.perft import PerftConfig, attach, detach
from perft_cli.perft.block import PerftAdapter
from perft_cli.perft.experts import DENSE_MAX_WIDTH, ExpertBank
from perft_cli.tiny import BENCH_OLMOE, tiny_model


def loop_forward(self: ExpertBank, h, index=None, weights=None):
    """The per-expert loop that MoE LoRA tools use: select each expert's tokens, run it, scatter back."""
    x = self._input(h)  # [T, D]
    out = torch.zeros_like(x)
    if index is None:
        for e in range(self.num_experts):
            out = out + self._bottleneck(x @ self.perft_A[e]) @ self.perft_B[e]
        return out
    for e in range(self.num_experts):
        tok, slot = torch.where(index == e)  # tokens routed to expert e
        if tok.numel() == 0:
            continue
        y = self._bottleneck(x[tok] @ self.perft_A[e]) @ self.perft_B[e]  # [t_e, D]
        out = out.index_add(0, tok, y * weights[tok, slot, None])
    return out


def make_model(experts: int, top_k: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    model = tiny_model("olmoe", dtype=dtype, **{**BENCH_OLMOE, "num_experts": experts, "num_experts_per_tok": top_k})
    return model.to(device)


CLOCK = time.perf_counter  # main() switches to the thread's CPU time with --threads 1 on the CPU


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hidden(tokens: int, hidden: int, device: torch.device) -> torch.Tensor:
    """Random block inputs [tokens, hidden]: bf16 on CUDA (a bf16 base's hidden states), fp32 on the CPU."""
    return torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA, as `perft train` runs a bf16 base there; nothing on the CPU (fp32 throughout)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def one_step(model, ids) -> float:
    """Seconds for one forward + backward; the gradient flows to the input embeddings (and any adapter)."""
    inputs = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # [B, S, D]
    _sync(ids.device)
    t0 = CLOCK()
    with _autocast(ids.device):
        loss = model(inputs_embeds=inputs).logits.float().pow(2).mean()
    loss.backward()
    _sync(ids.device)
    dt = CLOCK() - t0
    model.zero_grad(set_to_none=True)
    return dt


def timed(model, ids, cfg: PerftConfig | None, impl: str) -> float:
    """One step with the adapter of cfg attached (None: the base alone) and its bank computed by impl."""
    if cfg is None:
        return one_step(model, ids)
    adapters = attach(model, find_moe_blocks(model), cfg)
    original = ExpertBank.forward
    try:
        if impl == "loop":
            ExpertBank.forward = loop_forward
        else:
            for a in adapters:
                a.experts.impl = impl
        return one_step(model, ids)
    finally:
        ExpertBank.forward = original
        detach(model)


def compare(model, ids, candidates: dict[str, tuple[PerftConfig | None, str]], repeats: int) -> dict[str, float]:
    """Median step time of each candidate, measured round-robin so that load changes on a noisy machine hit
    every candidate alike (one warm-up round first). ``ovh:NAME`` is the median over rounds of NAME's time minus
    the base's time in the same round (needs a ``base`` candidate): a paired difference, steadier than the
    difference of two medians when the machine's speed drifts."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for i in range(repeats + 1):
        for name, (cfg, impl) in candidates.items():
            dt = timed(model, ids, cfg, impl)
            if i:
                times[name].append(dt)
    out = {name: statistics.median(t) for name, t in times.items()}
    if "base" in times:
        out["spread:base"] = max(times["base"]) - min(times["base"])
        for name, t in times.items():
            out[f"ovh:{name}"] = statistics.median(a - b for a, b in zip(t, times["base"], strict=True))
    return out


def time_calls(calls: dict, h: torch.Tensor, repeats: int) -> dict:
    """Median ms of each ``call(x)``'s forward + backward on a fresh leaf copy of h, round-robin, 3 warm-ups.

    The backward starts from a fixed output gradient: no loss is computed, so only the adapter is timed."""
    grad = torch.randn_like(h)  # d(loss)/d(output), output shaped like h
    times: dict = {key: [] for key in calls}
    for i in range(repeats + 3):
        for key, call in calls.items():
            x = h.clone().requires_grad_(True)
            _sync(h.device)
            t0 = CLOCK()
            with _autocast(h.device):
                out = call(x)
            out.backward(grad.to(out.dtype))
            _sync(h.device)
            if i >= 3:
                times[key].append(CLOCK() - t0)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def with_loop(adapter: PerftAdapter) -> PerftAdapter:
    """The adapter with its bank computed by the per-expert loop (this instance only)."""
    adapter.experts.forward = types.MethodType(loop_forward, adapter.experts)
    return adapter


def layer_alone(
    ns, k: int, r: int, tokens: int, hidden: int, device, repeats: int, impls=("auto", "grouped", "loop")
) -> tuple[dict[tuple[int, str], float], dict[int, int]]:
    """Median ms of one PERFT-R PerftAdapter's forward + backward on [tokens, hidden] inputs, without the model
    around it: the same costs as the step overheads above with none of the base's noise (many more repeats fit).
    Also returns each N's activated parameters per token (method.md, router included)."""
    layers = {}
    for n in ns:
        for impl in impls:
            path = "auto" if impl == "loop" else impl
            cfg = PerftConfig(variant="perft-r", num_experts=n, top_k=k, rank=r, dropout=0.0, impl=path)
            layers[n, impl] = PerftAdapter(cfg, hidden, 16, 4, device=device)
            if impl == "loop":
                with_loop(layers[n, impl])
    act = {n: layers[n, "auto"].activated_params() for n in ns}
    return time_calls(layers, _hidden(tokens, hidden, device), repeats), act


def perft_e_alone(r: int, tokens: int, hidden: int, device, repeats: int) -> dict[str, float]:
    """Median ms of one PERFT-E adapter (64 experts, top-8 of a random frozen routing), stacked and loop."""
    logits = torch.randn(tokens, 64, device=device)
    weights, index = torch.softmax(logits, -1).topk(8, dim=-1)  # [T, 8] like OLMoE's unnormalised top-k
    cfg = PerftConfig(variant="perft-e", rank=r, dropout=0.0)
    stacked = PerftAdapter(cfg, hidden, 64, 8, device=device)
    loop = with_loop(PerftAdapter(cfg, hidden, 64, 8, device=device))
    calls = {"stacked": lambda x: stacked(x, weights, index), "loop": lambda x: loop(x, weights, index)}
    return time_calls(calls, _hidden(tokens, hidden, device), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (the reference setup uses 16)")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (the reference setup uses 256)")
    ap.add_argument("--ranks", default="", help="ranks for a layer-alone N=64/N=2 sweep, e.g. 4,8,16,32")
    ap.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16 base, fp32 adapters, bf16 autocast)")
    args = ap.parse_args()
    global CLOCK
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads == 1 and device.type == "cpu":
        # One thread runs every op on this thread: its CPU time leaves out the time other processes of a shared
        # machine take the core, which wall time counts (a few-ms overhead on a 200 ms step drowns in that).
        CLOCK = time.thread_time
    torch.manual_seed(0)
    ids = torch.randint(0, 1024, (args.batch, args.seq)).to(device)
    shape = f"{args.batch}x{args.seq} tokens, {'bf16 ' + args.device if device.type == 'cuda' else 'fp32 CPU'}"

    model = make_model(16, 4, args.device, dtype)
    r, k = 16, 2
    ns = (2, 8, 32, 64)
    cands: dict[str, tuple[PerftConfig | None, str]] = {"base": (None, "")}
    for n in ns:
        cfg = PerftConfig(variant="perft-r", num_experts=n, top_k=k, rank=r, dropout=0.0)
        cands[f"stacked{n}"] = (cfg, "auto")
        cands[f"grouped{n}"] = (cfg, "grouped")
        cands[f"loop{n}"] = (cfg, "loop")
    t = compare(model, ids, cands, args.repeats)
    base = t["base"]
    print(f"PERFT-R, K={k}, r={r}, lora experts; OLMoE-shaped 16x top-4, 4 layers, {shape}")
    clock = "thread CPU time" if CLOCK is time.thread_time else "wall time"
    print(f"frozen base forward+backward: {base * 1e3:.1f} ms (median of {args.repeats}, round-robin, {clock})")
    print("overhead = step - base step of the same round (median); auto = the path the bank picks (DENSE_MAX_WIDTH)")
    head = ("N", 4), ("auto ms", 8), ("auto ovh", 9), ("grouped ovh", 12), ("loop ms", 8), ("loop ovh", 9)
    print(" ".join(f"{h:>{w}}" for h, w in head), f"{'loop/auto':>10}")
    for n in ns:
        st, lp = t[f"stacked{n}"], t[f"loop{n}"]
        print(
            f"{n:>4} {st * 1e3:>8.1f} {t[f'ovh:stacked{n}'] * 1e3:>9.1f} {t[f'ovh:grouped{n}'] * 1e3:>12.1f} "
            f"{lp * 1e3:>8.1f} {t[f'ovh:loop{n}'] * 1e3:>9.1f} {lp / st:>9.2f}x"
        )
    auto_ratio = t["ovh:stacked64"] / t["ovh:stacked2"]
    grouped_ratio = t["ovh:grouped64"] / t["ovh:grouped2"]
    print(
        f"overhead ratio N=64 / N=2: {auto_ratio:.2f} as picked (target <= 1.5), {grouped_ratio:.2f} on the grouped "
        f"path alone; stacked faster than loop for N >= 8: "
        f"{all(t[f'stacked{n}'] < t[f'loop{n}'] for n in ns if n >= 8)}"
    )
    hidden = BENCH_OLMOE["hidden_size"]
    act = {  # method.md: K experts of 2 D r each, plus the router's N D
        n: PerftAdapter(PerftConfig(num_experts=n, top_k=k, rank=r), hidden, 16, 4, device="meta").activated_params()
        for n in (2, 64)
    }
    print(
        f"activated parameters per token and layer (method.md, router included): N=2 {act[2]:,}, N=64 {act[64]:,}: "
        f"a cost that followed them exactly would give {act[64] / act[2]:.2f}"
    )
    print(
        f"(step overheads are differences of {base * 1e3:.0f} ms steps; the base step alone ranged over "
        f"{t['spread:base'] * 1e3:.0f} ms across rounds: where they disagree with the layer-alone tables below, "
        "trust those)"
    )

    tokens = args.batch * args.seq
    lt, _ = layer_alone(ns, k, r, tokens, hidden, device, repeats=20 * args.repeats)
    print(f"\none PERFT-R layer alone, forward+backward on [{tokens}, {hidden}] (median of {20 * args.repeats}), ms:")
    print("   N    auto  grouped     loop  loop/auto")
    for n in ns:
        print(
            f"{n:>4} {lt[n, 'auto']:>7.3f} {lt[n, 'grouped']:>8.3f} {lt[n, 'loop']:>8.3f} "
            f"{lt[n, 'loop'] / lt[n, 'auto']:>9.2f}x"
        )
    print(
        f"layer ratio N=64 / N=2: {lt[64, 'auto'] / lt[2, 'auto']:.2f} as picked, "
        f"{lt[64, 'grouped'] / lt[2, 'grouped']:.2f} on the grouped path alone (activated parameters: "
        f"{act[64] / act[2]:.2f}); stacked faster than loop for N >= 8: "
        f"{all(lt[n, 'auto'] < lt[n, 'loop'] for n in ns if n >= 8)}"
    )
    if args.ranks:
        print(f"\nranks of the paper's sweep, one layer alone on [{tokens}, {hidden}], K={k}: N=64 / N=2 (ms ratio)")
        print(f"{'r':>4} {'auto':>6} {'grouped':>8} {'activated':>10}  (activated: method.md, router included)")
        for rank in (int(x) for x in args.ranks.split(",")):
            lt, act = layer_alone((2, 64), k, rank, tokens, hidden, device, 10 * args.repeats, ("auto", "grouped"))
            auto, grouped = lt[64, "auto"] / lt[2, "auto"], lt[64, "grouped"] / lt[2, "grouped"]
            print(f"{rank:>4} {auto:>6.2f} {grouped:>8.2f} {act[64] / act[2]:>10.2f}")

    shapes = ((2, 16), (4, 16), (8, 16), (16, 16), (64, 16))
    print(
        f"\ncompute paths of the stacked bank (PERFT-R, K=2), one layer alone on [{tokens}, {hidden}] "
        f"(median of {10 * args.repeats}), ms; auto = dense while N*r <= {DENSE_MAX_WIDTH}"
    )
    print(f"{'N':>4} {'r':>4} {'N*r':>5} {'dense':>8} {'grouped':>8}  auto picks")
    calls = {
        (n, impl): PerftAdapter(
            PerftConfig(variant="perft-r", num_experts=n, top_k=k, rank=rank, dropout=0.0, impl=impl),
            hidden,
            16,
            4,
            device=device,
        )
        for n, rank in shapes
        for impl in ("dense", "grouped")
    }
    t = time_calls(calls, _hidden(tokens, hidden, device), 10 * args.repeats)
    for n, rank in shapes:
        pick = "dense" if ExpertBank(n, 8, rank, device="meta").use_dense() else "grouped"
        print(f"{n:>4} {rank:>4} {n * rank:>5} {t[n, 'dense']:>8.3f} {t[n, 'grouped']:>8.3f}  {pick}")

    model = make_model(64, 8, args.device, dtype)
    cfg = PerftConfig(variant="perft-e", rank=r, dropout=0.0)
    t = compare(model, ids, {"base": (None, ""), "stacked": (cfg, "auto"), "loop": (cfg, "loop")}, args.repeats)
    base, st, lp = t["base"], t["stacked"], t["loop"]
    ovh_st, ovh_lp = t["ovh:stacked"], t["ovh:loop"]
    print(f"\nPERFT-E, r={r}, on a 64-expert top-8 OLMoE-shaped model (step ms)")
    print(
        f"base {base * 1e3:.1f}, stacked {st * 1e3:.1f} (overhead {ovh_st * 1e3:.1f}), "
        f"loop {lp * 1e3:.1f} (overhead {ovh_lp * 1e3:.1f}); loop/stacked {lp / st:.2f}x"
    )
    e = perft_e_alone(r, tokens, hidden, device, 10 * args.repeats)
    print(
        f"one PERFT-E layer alone on [{tokens}, {hidden}] (median of {10 * args.repeats}): stacked "
        f"{e['stacked']:.3f} ms, loop {e['loop']:.3f} ms; loop/stacked {e['loop'] / e['stacked']:.2f}x"
    )


if __name__ == "__main__":
    main()
