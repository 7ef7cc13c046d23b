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
  activated adapter parameters; PERFT-E reuses the base experts' sort of the (token, expert) pairs), from the
  table's rows and, against PERFT-R with its bank, once more from two workers taking turns call by call.
- ``--profile``: where a PERFT-R step's time goes (torch.profiler, top operators, matmuls vs the rest).
- ``--experts-alone``: layer 0's experts call alone, stock vs perft, against the same grouped GEMMs timed alone and
  as one dense GEMM: what an experts routine over these GEMMs could save at most, as a share of a PERFT-R step.
- ``--layer-alone``: one PERFT-R layer alone at the paper's batch (16 x 256), N in 2..64: cost ratio N=64 / N=2
  against the activated-parameter ratio (method.md accounting).

Timings are medians of interleaved repeats (each variant alternates the two paths step by step, so machine noise
hits both alike). Run it on a quiet machine with one thread; the ratios, not the seconds, are what to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
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


def build_shape(args) -> dict[str, int]:
    return dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        vocab_size=args.vocab,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )


def build_model(args, device: torch.device):
    shape = build_shape(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = tiny_model("olmoe", seed=0, dtype=dtype, **shape).to(device)
    model.requires_grad_(False)
    return model, shape


def set_path(model, path: str) -> None:
    select_frozen_experts(model, PATHS[path])


def arms(device: torch.device) -> dict[str, tuple[str, bool]]:
    """The stacks the table compares: (experts path, perft's CPU allocator setting). On the CPU perft also keeps
    freed memory for reuse (perft_cli/allocator.py), a process-wide malloc setting that cannot be undone in a
    process, so each arm runs in its own worker; ``perft-experts`` (perft's experts path under glibc's default
    malloc) splits the two effects. On CUDA perft leaves the host allocator alone: two arms."""
    if device.type != "cpu":
        return {"stock": ("grouped_mm", False), "perft": (IMPLEMENTATION, False)}
    return {"stock": ("grouped_mm", False), "perft-experts": (IMPLEMENTATION, False), "perft": (IMPLEMENTATION, True)}


def clock(device: torch.device) -> float:
    """Wall time on CUDA; on the CPU this process's CPU time, which other processes on a shared machine barely
    disturb (wall time there measured the neighbours: a 2-core machine with 4 busy processes doubled it)."""
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def time_once(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = clock(device)
    fn()
    sync(device)
    return clock(device) - t0


def make_batch(args, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)  # [B, S]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _worker(conn, experts: str, keep_memory: bool, args) -> None:
    """One arm: its own model (the same seed in every arm), timing one call at a time when the parent says."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, _ = build_model(args, device)
    select_frozen_experts(model, experts)
    allocator = "glibc's default"
    if keep_memory:  # once the model is built, as load_model does
        from perft_cli.allocator import keep_freed_memory

        allocator = keep_freed_memory()  # "kept", or why not (the user's own malloc setting, not glibc)
    conn.send({"experts": model.config._experts_implementation, "allocator": allocator})
    acc = accelerator(SimpleNamespace(device=device))
    batch = make_batch(args, device)
    fn = cleanup = None
    while True:
        cmd, name = conn.recv()
        if cmd == "row":
            fn, cleanup = row_fn(name, model, batch, acc, device)
            conn.send(None)
        elif cmd == "run":
            conn.send(time_once(fn, device))
        elif cmd == "end-row":
            cleanup()
            conn.send(None)
        else:
            conn.close()
            return


class Worker:
    def __init__(self, ctx, arm: str, spec: tuple[str, bool], args):
        self.arm = arm
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, *spec, args), daemon=True)
        self.process.start()
        child.close()
        self.stack = self._recv()  # what the worker runs: its experts path and allocator setting

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join(timeout=10)
            raise RuntimeError(f"the {self.arm} worker died (exit code {self.process.exitcode})") from None

    def call(self, cmd: str, name: str | None = None):
        self.conn.send((cmd, name))
        return self._recv()

    def stop(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(("stop", None))
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def alternating(timed: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds of each timed call (it returns its own seconds), the calls taking turns (one warm-up each) and
    in reversed order every other round, so machine noise hits them alike."""
    order = list(timed)
    times: dict[str, list[float]] = {k: [] for k in order}
    for r in range(repeats + 1):
        for k in order if r % 2 == 0 else order[::-1]:
            t = timed[k]()
            if r:
                times[k].append(t)
    return {k: statistics.median(t) for k, t in times.items()}


def turns(workers: dict[str, Worker], repeats: int) -> dict[str, float]:
    """Median seconds of each worker's loaded call, the workers taking turns call by call."""
    return alternating({k: (lambda w=w: w.call("run")) for k, w in workers.items()}, repeats)


def interleaved(workers: dict[str, Worker], name: str, repeats: int) -> dict[str, float]:
    """One row of the table: its call in every arm, taking turns."""
    for w in workers.values():
        w.call("row", name)
    medians = turns(workers, repeats)
    for w in workers.values():
        w.call("end-row")
    return medians


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
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    workers = {arm: Worker(ctx, arm, spec, args) for arm, spec in arms(device).items()}
    rows = {}
    try:
        for name in ROWS:
            rows[name] = interleaved(workers, name, args.repeats)
            print(f"  {name:<15}" + "   ".join(f"{a} {t:.3f} s" for a, t in rows[name].items()), flush=True)
    finally:
        for w in workers.values():
            w.stop()
    shape = build_shape(args)
    result = {"shape": shape, "batch": [args.batch, args.seq], "device": str(device), "arms": list(workers)}
    result["stacks"] = {a: w.stack for a, w in workers.items()}
    result["rows"] = rows
    for arm in workers:
        fwd, floor = rows["frozen-forward"][arm], rows["floor"][arm]
        result[arm] = {
            name: {"over_forward": rows[name][arm] / fwd, "over_floor": rows[name][arm] / floor} for name in ROWS[1:]
        }
    result["speedup"] = {name: rows[name]["stock"] / rows[name]["perft"] for name in ROWS}
    if "perft-experts" in workers:  # the experts path's share of it, under glibc's default malloc like stock
        result["speedup_experts_path"] = {name: rows[name]["stock"] / rows[name]["perft-experts"] for name in ROWS}
    result["perft_e_over_perft_r"] = {a: rows["perft-e"][a] / rows["perft-r"][a] for a in workers}
    result["perft_e_over_perft_r_e_size"] = {a: rows["perft-e"][a] / rows["perft-r-e-size"][a] for a in workers}
    result["perft_e_vs_r_interleaved"] = e_against_r(ctx, args, device)
    if args.profile or args.experts_alone:  # in this process, under glibc's default malloc
        model, _ = build_model(args, device)
        acc = accelerator(SimpleNamespace(device=device))  # bf16 autocast on CUDA, none on the CPU
        set_path(model, "perft")
        if args.profile:
            result["profile"] = profile_perft_r(model, make_batch(args, device), acc, device)
        if args.experts_alone:
            result["experts_alone"] = ea = experts_alone(model, args, device, args.experts_repeats)
            # In a PERFT-R step every layer runs its experts forward and all but layer 0 their backward (nothing
            # below layer 0's experts trains): the most any experts routine could save of the stock path's step.
            stock = ea["bookkeeping_ms"]["stock"]
            per_step = args.layers * stock["forward"] + (args.layers - 1) * stock["backward"]
            ea["stock_bookkeeping_per_step_ms"] = per_step
            ea["of_perft_r_step"] = per_step / (1e3 * rows["perft-r"]["stock"])
    return result


def e_against_r(ctx, args, device) -> dict:
    """PERFT-E against PERFT-R with PERFT-E's bank, each in its own perft-arm worker, the two taking turns call by
    call: the table's rows run minutes apart, and this machine's speed drifts by more than the target's 10%."""
    spec = arms(device)["perft"]
    pair = {name: Worker(ctx, "perft", spec, args) for name in ("perft-e", "perft-r-e-size")}
    try:
        for name, w in pair.items():
            w.call("row", name)
        med = turns(pair, args.repeats)
    finally:
        for w in pair.values():
            w.stop()
    return {"seconds": med, "ratio": med["perft-e"] / med["perft-r-e-size"]}


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


def experts_alone(model, args, device, repeats: int) -> dict:
    """Layer 0's experts call alone at the step's T = batch x seq tokens, routed by its own router: stock against
    perft, forward (as layer 0 runs it in a step) and forward + backward (input and routing-weight gradients, as the
    layers above it run it), with the four grouped GEMMs of the call timed alone on the same sorted rows. What a call
    costs beyond its GEMMs is the bookkeeping an experts routine can remove; no routine over these GEMMs can save
    more. The GEMMs are also timed as one dense GEMM of the same FLOPs (one expert's weights for every row): the rate
    this BLAS reaches when the weights are not re-packed for every expert's few rows."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    from perft_cli.perft.frozen_experts import _project, _project_back, frozen_experts_forward, make_dispatch

    block = model.model.layers[0].mlp
    experts = block.experts
    T, D = args.batch * args.seq, args.hidden
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, D, generator=g).to(device)  # [T, D]
    with torch.no_grad():
        _, top_w, top_i = block.gate(hidden)  # [T, k], [T, k]
    fns = {"stock": grouped_mm_experts_forward, "perft": frozen_experts_forward}

    def call(path: str, backward: bool):
        x, w = hidden.detach().requires_grad_(backward), top_w.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            y = fns[path](experts, x, top_i, w)  # [T, D]
        if backward:
            y.backward(torch.ones_like(y))

    d = make_dispatch(top_i, experts.num_experts)
    w_up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    rows = hidden.index_select(0, d.token)  # [S, D]
    up = _project(rows, w_up, d.offsets, experts.is_transposed)  # [S, 2I]
    act = up[:, : up.shape[-1] // 2].contiguous() if experts.has_gate else up  # [S, I]

    out = _project(act, experts.down_proj, d.offsets, experts.is_transposed)  # [S, D]

    def gemms_forward():
        _project(rows, w_up, d.offsets, experts.is_transposed)
        _project(act, experts.down_proj, d.offsets, experts.is_transposed)

    def gemms_backward():
        _project_back(out, experts.down_proj, d.offsets, experts.is_transposed)
        _project_back(up, w_up, d.offsets, experts.is_transposed)

    w0_up, w0_down = w_up[0], experts.down_proj[0]  # [2I, D] or [D, 2I]; [D, I] or [I, D]
    t = (lambda w: w) if experts.is_transposed else (lambda w: w.transpose(0, 1))

    def dense():
        rows @ t(w0_up)
        act @ t(w0_down)
        out @ t(w0_down).transpose(0, 1)
        up @ t(w0_up).transpose(0, 1)

    cases = {
        "stock forward": lambda: call("stock", False),
        "perft forward": lambda: call("perft", False),
        "stock forward+backward": lambda: call("stock", True),
        "perft forward+backward": lambda: call("perft", True),
        "grouped gemms forward": gemms_forward,
        "grouped gemms backward": gemms_backward,
        "dense gemm": dense,
    }

    timed = {k: (lambda fn=fn: time_once(fn, device)) for k, fn in cases.items()}
    ms = {k: 1e3 * v for k, v in alternating(timed, repeats).items()}
    ms["grouped gemms"] = ms["grouped gemms forward"] + ms["grouped gemms backward"]
    fwd_gemm, bwd_gemm = ms["grouped gemms forward"], ms["grouped gemms backward"]
    book = {
        p: {
            "forward": ms[f"{p} forward"] - fwd_gemm,
            "backward": ms[f"{p} forward+backward"] - ms[f"{p} forward"] - bwd_gemm,
        }
        for p in PATHS
    }
    return {
        "tokens": T,
        "pairs": int(d.perm.numel()),
        "repeats": repeats,
        "ms": ms,
        "bookkeeping_ms": book,
        "dense_over_grouped": ms["dense gemm"] / ms["grouped gemms"],
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
    arms_ = result["arms"]
    split = "perft-experts" in arms_
    print(f"\nOLMoE-shaped {result['shape']}, batch {result['batch']}, {result['device']}")
    print(
        "arms: "
        + "; ".join(f"{a}: experts {st['experts']}, malloc {st['allocator']}" for a, st in result["stacks"].items())
    )
    print(
        f"{'row':<15}"
        + "".join(f"{a + ' s':>16}" for a in arms_)
        + f"{'speed-up':>10}"
        + (f"{'experts path':>14}" if split else "")
        + f"{'/fwd':>7}{'/floor':>8}{'stock /fwd':>12}"
    )
    for name in ROWS:
        r = result["rows"][name]
        over = result["perft"].get(name, {})
        stock_over = result["stock"].get(name, {})
        print(
            f"{name:<15}"
            + "".join(f"{r[a]:>16.3f}" for a in arms_)
            + f"{result['speedup'][name]:>9.2f}x"
            + (f"{result['speedup_experts_path'][name]:>13.2f}x" if split else "")
            + (
                f"{over['over_forward']:>7.2f}{over['over_floor']:>8.2f}{stock_over['over_forward']:>12.2f}"
                if over
                else ""
            )
        )
    if split:
        print(
            "speed-up: stock / perft (perft's experts path and its CPU allocator setting); experts path: stock / "
            "perft-experts (the experts path alone, glibc's default malloc in both)"
        )
    e, same = result["perft_e_over_perft_r"], result["perft_e_over_perft_r_e_size"]
    print("PERFT-E / PERFT-R (N8 K2) step: " + ", ".join(f"{a} {v:.3f}" for a, v in e.items()))
    print(
        "PERFT-E / PERFT-R at PERFT-E's size (N=E, K=k, r8: equal activated adapter parameters): "
        + ", ".join(f"{a} {v:.3f}" for a, v in same.items())
        + " (target <= 1.1)"
    )
    pair = result["perft_e_vs_r_interleaved"]
    print(
        f"PERFT-E / PERFT-R at PERFT-E's size, the two interleaved call by call (perft arm): {pair['ratio']:.3f} "
        f"({pair['seconds']['perft-e']:.3f} s / {pair['seconds']['perft-r-e-size']:.3f} s; target <= 1.1)"
    )
    slower = [n for n in ROWS[2:] if result["speedup"][n] < 1.0]
    print("every variant faster on the perft path:", "yes" if not slower else f"no ({', '.join(slower)})")
    if "profile" in result:
        p = result["profile"]
        print(f"\nPERFT-R step profile (perft path): {p['total_ms']:.0f} ms, matmuls {p['matmul_share']:.0%}")
        for row in p["top"]:
            print(f"  {row['op']:<48}{row['ms']:>9.1f} ms {row['share']:>6.1%}")
    if "experts_alone" in result:
        ea, ms = result["experts_alone"], result["experts_alone"]["ms"]
        print(
            f"\nlayer 0's experts call alone, {ea['tokens']} tokens ({ea['pairs']} pairs), "
            f"median of {ea['repeats']} (ms):"
        )
        for kind in ("forward", "forward+backward"):
            s, p = ms[f"stock {kind}"], ms[f"perft {kind}"]
            print(f"  {kind:<18} stock {s:8.1f}   perft {p:8.1f}   speed-up {s / p:.2f}x")
        print(
            f"  its four grouped GEMMs alone {ms['grouped gemms']:.1f} (forward {ms['grouped gemms forward']:.1f}, "
            f"backward {ms['grouped gemms backward']:.1f}); as one dense GEMM of the same FLOPs "
            f"{ms['dense gemm']:.1f} ({ea['dense_over_grouped']:.2f}x the time)"
        )
        for p, b in ea["bookkeeping_ms"].items():
            print(f"  beyond the GEMMs, {p}: forward {b['forward']:.1f}, backward {b['backward']:.1f}")
        print(
            f"  all of the stock path's bookkeeping in a PERFT-R step: {ea['stock_bookkeeping_per_step_ms']:.0f} ms = "
            f"{ea['of_perft_r_step']:.1%} of the step (the most any experts routine over these GEMMs could save; "
            "measured in one process under glibc's default malloc)"
        )
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
    ap.add_argument(
        "--experts-alone", action="store_true", help="layer 0's experts call alone, stock vs perft, against its GEMMs"
    )
    ap.add_argument("--experts-repeats", type=int, default=21)
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
