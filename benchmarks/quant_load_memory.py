"""Peak RAM while loading a checkpoint with ``load_model_nf4`` grows with the 4-bit size per layer, not the bf16 size.

Run:  .venv/bin/python benchmarks/quant_load_memory.py [--hidden 1024 --intermediate 2048 --experts 16]

Saves random OLMoE-shaped bf16 checkpoints with 2 and 4 layers (~0.4 and ~0.8 GB at the defaults) into a temporary
directory, loads each in a fresh subprocess (NF4 through ``load_model_nf4``, and a plain bf16 load as the baseline
measured in the same run), and prints the peak increment over the pre-load RSS. The per-layer figure is
(peak(4 layers) - peak(2 layers)) / 2, so constant costs (imports, embeddings, one layer's transient bf16 tensor)
cancel out. Two peaks are reported: anonymous memory (RssAnon, sampled every ~0.5 ms by a thread; the memory the
load really allocates) and VmHWM (the kernel's high-water mark, which also counts the checkpoint's mmap-ed file pages
that transformers keeps mapped during the load: page cache, shared and reclaimable, one bf16 copy of the file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def child(path: str, mode: str) -> None:
    """Load ``path`` once and print a JSON line with the RSS figures (runs in a fresh interpreter)."""
    import torch
    from transformers import AutoModelForCausalLM

    from perft_cli.quant import audit, load_model_nf4

    sys.setswitchinterval(0.0005)  # let the sampler thread in often while the loader runs Python code
    base_anon, base_rss = _status_kib("RssAnon"), _status_kib("VmRSS")
    peak = {"anon": base_anon}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _status_kib("RssAnon"))
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if mode == "nf4":
        model = load_model_nf4(path, device_map={"": "cpu"})
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map={"": "cpu"})
    done.set()
    sampler.join()
    peak["anon"] = max(peak["anon"], _status_kib("RssAnon"))
    a = audit(model, quantization="nf4" if mode == "nf4" else "none")
    print(
        json.dumps(
            {
                "peak_anon": (peak["anon"] - base_anon) * 1024,
                "hwm": (_status_kib("VmHWM") - base_rss) * 1024,
                "final_anon": (_status_kib("RssAnon") - base_anon) * 1024,
                "model_bytes": a["total_bytes"],
            }
        )
    )


def run_child(path: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TQDM_DISABLE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path), "--mode", mode],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, nargs=2, default=(2, 4))
    ap.add_argument("--child")
    ap.add_argument("--mode", choices=("nf4", "bf16"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.mode)
        return

    import torch
    from transformers import AutoModelForCausalLM

    from perft_cli.quant import estimate_bytes
    from perft_cli.tiny import save_tiny, tiny_config

    shape = dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_experts=args.experts,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
    )
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="perft-quant-mem-") as tmp:
        for n in args.layers:
            path = Path(tmp) / f"olmoe-{n}"
            save_tiny(path, "olmoe", dtype=torch.bfloat16, num_hidden_layers=n, **shape)
            for mode in ("bf16", "nf4"):
                results[mode, n] = run_child(path, mode)
            (path / "model.safetensors").unlink()  # keep at most one checkpoint on disk

    def layer_bytes(quantization: str) -> float:
        sizes = []
        for n in args.layers:
            with torch.device("meta"):
                meta = AutoModelForCausalLM.from_config(
                    tiny_config("olmoe", num_hidden_layers=n, **shape), dtype=torch.bfloat16
                )
            sizes.append(estimate_bytes(meta, quantization=quantization)["total_bytes"])
        return (sizes[1] - sizes[0]) / (args.layers[1] - args.layers[0])

    nf4_layer, bf16_layer = layer_bytes("nf4"), layer_bytes("none")
    lo, hi = args.layers
    print(
        f"OLMoE-shaped, hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts; "
        f"layers {lo} and {hi}"
    )
    print(f"one layer: {nf4_layer / MiB:.1f} MiB in NF4, {bf16_layer / MiB:.1f} MiB in bf16")
    for mode in ("bf16", "nf4"):
        for key, label in (("peak_anon", "peak anon RSS"), ("hwm", "VmHWM"), ("final_anon", "final anon RSS")):
            a, b = results[mode, lo][key], results[mode, hi][key]
            per_layer = (b - a) / (hi - lo)
            print(
                f"{mode:>4} load, {label:>14}: +{a / MiB:7.1f} MiB ({lo} layers), +{b / MiB:7.1f} MiB ({hi} layers), "
                f"{per_layer / MiB:6.1f} MiB/layer = {per_layer / nf4_layer:.2f}x NF4 layer, "
                f"{per_layer / bf16_layer:.2f}x bf16 layer"
            )


if __name__ == "__main__":
    main()
