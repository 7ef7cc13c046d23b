"""Evaluation throughput: batched (left-padded, length-sorted) generation against one prompt at a time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_throughput.py --threads 1    # tiny OLMoE + PERFT-R, CPU
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_throughput.py --threads 1 --kind arithmetic

All runs use the paper's protocol (LLM-Adapters prompts, 4-beam search) on the same prompts, in one process, and
the script checks that they give the same responses. Prints examples/s for: one prompt at a time with plain
``generate`` (the LLM-Adapters loop), one at a time as ``perft eval`` runs it (the prompts' shared prefix computed
once, each prompt once rather than once per beam), batched without the shared prefix, and batched as ``perft eval``
runs it (batch sizes from ``eval.batch_tokens`` unless --batch-size); then the ratios. The model is a tiny random
MoE (perft_cli.tiny) with random PERFT-R adapters, so this measures the loop, not a real model. On a busy CPU, time
with ``--threads 1``: with 2 threads, many tiny kernels wait on each other and one-at-a-time runs slow down out of
proportion. The machine's load moves absolute numbers a lot; the ratios of one run are what compare.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch

from perft_cli.adapters import attach_adapter
from perft_cli.config import AdapterConfig, EvalConfig, ModelConfig
from perft_cli.evaluation.generation import batches, generate_responses
from perft_cli.modeling import load_model, load_tokenizer
from perft_cli.prompts import eval_prompt
from perft_cli.tiny import save_tiny

WORDS = ["the", "a", "red", "blue", "ball", "cup", "sits", "in", "on", "under", "kitchen", "garden", "who", "what"]


def make_prompts(n: int, kind: str, seed: int = 0) -> list[str]:
    """``n`` evaluation prompts with questions of 3 to 40 words (lengths vary as in real test sets)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        if kind == "commonsense":
            question += "? Option1: yes Option2: no Answer format: option1/option2"
        else:
            question = f"{question}. What is {rng.randint(1, 99)} + {rng.randint(1, 99)}?"
        prompts.append(eval_prompt(question, "", commonsense=kind == "commonsense"))
    return prompts


def timed(model, tokenizer, prompts: list[str], max_new_tokens: int, **kwargs):
    """Responses, wall seconds and this process's CPU seconds (what a shared machine's other load leaves out)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = generate_responses(model, tokenizer, prompts, num_beams=4, max_new_tokens=max_new_tokens, **kwargs)
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="olmoe", help="tiny model family (perft_cli.tiny.FAMILIES)")
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: --batch-tokens)")
    parser.add_argument("--batch-tokens", type=int, default=EvalConfig().batch_tokens, help="eval.batch_tokens")
    parser.add_argument("--kind", choices=["commonsense", "arithmetic"], default="commonsense")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: 4 commonsense, 16 arithmetic")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="time each way this often, keep the best")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    max_new = args.max_new_tokens or (4 if args.kind == "commonsense" else 16)

    with tempfile.TemporaryDirectory() as tmp:  # loaded as `perft eval` loads a model (default attention)
        cfg = ModelConfig(name_or_path=str(save_tiny(tmp, args.family, seed=0)), dtype="float32")
        model, family = load_model(cfg)
        tokenizer = load_tokenizer(cfg)
    torch.manual_seed(1)
    attach_adapter(model, AdapterConfig(variant="perft-r", num_experts=4, top_k=2, rank=8), family)
    model.eval()
    with torch.no_grad():  # non-trivial adapter weights, so the adapters really change the output
        for name, p in model.named_parameters():
            if "perft_B" in name:
                p.normal_(0.0, 0.05)
    if torch.cuda.is_available():
        model.to("cuda")
    prompts = make_prompts(args.prompts, args.kind)
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    timed(model, tokenizer, prompts[:2], max_new, batch_size=2)  # warm-up (allocator, kernels)

    sizing = dict(batch_size=args.batch_size, batch_tokens=args.batch_tokens)
    ways = {  # name -> generate_responses keywords
        "one at a time, plain generate": dict(batch_size=1, shared_prefill=False),
        "one at a time, perft eval": dict(batch_size=1),
        "batched, no shared prefix": dict(sizing, shared_prefix=False),
        "batched, perft eval": sizing,
    }
    best = dict.fromkeys(ways, float("inf"))
    best_cpu = dict.fromkeys(ways, float("inf"))
    responses = {}
    for _ in range(args.repeats):  # interleaved, so a burst of load from other processes hits all alike
        for name, kwargs in ways.items():
            responses[name], t, cpu = timed(model, tokenizer, prompts, max_new, **kwargs)
            best[name], best_cpu[name] = min(best[name], t), min(best_cpu[name], cpu)
    n = len(prompts)
    device = "cuda" if torch.cuda.is_available() else f"cpu ({args.threads} threads)"
    print(f"tiny {args.family} + PERFT-R, {n} {args.kind} prompts ({min(lengths)}-{max(lengths)} tokens), 4 beams,")
    print(f"{max_new} new tokens, attention {model.config._attn_implementation}, {device}, best of {args.repeats}")
    sizes = [len(b) for b in batches(lengths, **sizing, new_tokens=max_new, num_beams=4)]
    how = f"--batch-size {args.batch_size}" if args.batch_size else f"token budget {args.batch_tokens}"
    print(f"batches of {', '.join(map(str, sizes))} prompts ({how})")
    for name, t in best.items():
        print(f"{name + ':':37s} {n / t:8.2f} examples/s  ({t:.2f} s, cpu {best_cpu[name]:.2f} s)")
    names = list(ways)
    print(f"{'speed-up, batched vs plain loop:':37s} {best[names[0]] / best[names[3]]:8.2f}x")
    print(f"{'  the same in CPU time:':37s} {best_cpu[names[0]] / best_cpu[names[3]]:8.2f}x")
    print(f"{'speed-up, batched vs one at a time:':37s} {best[names[1]] / best[names[3]]:8.2f}x")
    print(f"{'speed-up from the shared prefix:':37s} {best[names[2]] / best[names[3]]:8.2f}x")
    same = [sum(a == b for a, b in zip(responses[names[0]], responses[m], strict=True)) for m in names[1:]]
    print(f"{'same responses as the plain loop:':37s} {min(same)}/{n}")
    if min(same) < n:
        raise SystemExit("the batched responses differ from the plain loop's")


if __name__ == "__main__":
    main()
