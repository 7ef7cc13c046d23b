"""Pretrain the demo's tiny OLMoE (and its tokenizer) on the synthetic corpus of scripts/demo_data.py.

    python scripts/pretrain_tiny_moe.py --out demo/tiny-moe     # 3000 steps, ~9 min on ONE CPU thread, fp32

Steps: (1) train a byte-level BPE tokenizer (vocab 1024) on the pretraining text; (2) build a 4-layer OLMoE
(hidden 128, 8 experts of width 128, top-2, no top-k renormalisation, like OLMoE-1B-7B; 2.1 M parameters) from a
fixed seed; (3) train it as a causal LM (AdamW, warmup + cosine, LM loss + router_aux_loss_coef * load-balancing
loss) on packed 128-token blocks of the corpus plus generic Alpaca-style instruction examples (repeat a word,
opposites, bare sums, the corpus's yes/no and either/or questions, ...) that teach the prompt's shell but never the
downstream tasks' prompts or answers; (4) save model (safetensors, float32, 8.5 MB) and tokenizer to --out, print
the share of world facts recalled and a few greedy generations.

Deterministic: the same command with the same torch build and thread count gives bit-identical files (checked
twice on torch 2.13 CPU). One thread is the default because it is also the fastest on a shared 2-core machine
(2 threads that compete with other processes were ~10x slower here). The shipped demo/tiny-moe was made by the
command above (final LM loss ~0.74, 552 s).
"""

from __future__ import annotations

import argparse
import importlib
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3


def instruction_docs(dd, seed: int, n: int) -> list[tuple[str, ...]]:
    """Generic instruction examples, half in the training template (one text) and half as (evaluation prompt,
    response): evaluation tokenizes the prompt alone, so its trailing 16 spaces become tokens of their own that
    the model must have seen followed by an answer."""
    rng = random.Random(seed + 10)
    docs = []
    for instruction, response in dd.instruction_examples(seed, n):
        if rng.random() < 0.5:
            docs.append((dd.train_prompt(instruction, response),))
        else:
            docs.append((dd.eval_prompt(instruction, commonsense=False), response))
    return docs


# Whitespace runs that hold a newline or 2+ spaces are pre-tokens of their own, never glued to the next word. The
# evaluation prompt ends in "\n" + 16 spaces; with GPT-2's regex that run tokenizes differently when a word follows
# (training: "\n"+15 spaces, " 6") and when it ends the text (evaluation), so a fine-tuned model would meet a token
# at evaluation that it never saw in training. With this split, tokens(eval prompt) is a prefix of tokens(prompt +
# answer) for both tasks. Digit runs are pre-tokens of their own too, so a number is the same token after a space,
# a newline or "Option" ("6" in "has 6 pears" and in the answer "6 - 1 = 5"): copying it needs no respelling.
WHITESPACE_RUN = Regex(r"[ \t]*\n\s*|[ \t]{2,}")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every string encodes without unknowns and decodes back to itself."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(WHITESPACE_RUN, behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def make_config(tokenizer: PreTrainedTokenizerFast) -> OlmoeConfig:
    return OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=128,  # per expert
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,  # as OLMoE-1B-7B
        router_aux_loss_coef=0.01,  # as OLMoE-1B-7B
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def epoch_blocks(dd, corpus, instructions, tokenizer, epoch, seed, block, lines_per_doc, n_instr) -> torch.Tensor:
    """One epoch of training data: documents (a few shuffled corpus lines, or one instruction example), each
    followed by EOS, shuffled, concatenated and cut into ``block``-token rows. Returns [n_blocks, block]."""
    rng = random.Random(seed * 1000 + epoch)
    lines = corpus[:]
    rng.shuffle(lines)
    docs = [(rng.choice(" \n").join(lines[i : i + lines_per_doc]),) for i in range(0, len(lines), lines_per_doc)]
    docs += rng.sample(instructions, n_instr)
    rng.shuffle(docs)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:  # each segment tokenized on its own, then EOS
        for segment in doc:
            ids += tokenizer(segment, add_special_tokens=False)["input_ids"]
        ids.append(eos)
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)  # [n_blocks, block]


@torch.no_grad()
def greedy(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


_PROBES = {  # attribute -> statement prefix whose next word is the value
    "colour": "The colour of the {e} is",
    "size": "The size of the {e} is",
    "room": "The {e} is in the",
    "job": "{e} works as a",
    "pet": "The pet of {e} is a",
    "city": "{e} lives in",
}


@torch.no_grad()
def fact_accuracy(model, tokenizer, world) -> float:
    """Share of the world's facts whose value is the greedy next token after a corpus-style prefix."""
    hits = 0
    for (entity, attribute), value in world.facts.items():
        ids = tokenizer(_PROBES[attribute].format(e=entity), return_tensors="pt")["input_ids"]
        first = tokenizer(" " + value, add_special_tokens=False)["input_ids"][0]
        hits += int(model(input_ids=ids).logits[0, -1].argmax()) == first
    return hits / len(world.facts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo/tiny-moe"))
    parser.add_argument("--seed", type=int, default=0, help="model init and data order seed")
    parser.add_argument("--data-seed", type=int, default=None, help="world seed (default: demo_data.SEED)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block", type=int, default=128, help="tokens per training row")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy 2-core box")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    dd = importlib.import_module("demo_data")  # scripts/ is on sys.path when run as a script
    data_seed = dd.SEED if args.data_seed is None else args.data_seed

    corpus = dd.pretrain_corpus(data_seed)
    instructions = instruction_docs(dd, data_seed, 3000)
    # Tokenizer text: the corpus joined both ways the training documents join it, and every instruction segment.
    tokenizer_texts = [sep.join(corpus[i : i + 8]) for sep in " \n" for i in range(0, len(corpus), 8)]
    tokenizer = train_tokenizer(tokenizer_texts + [seg for doc in instructions for seg in doc], args.vocab_size)
    print(f"corpus: {len(corpus)} lines, {len(instructions)} instruction examples, vocab {len(tokenizer)}")

    model = OlmoeForCausalLM(make_config(tokenizer))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    step, epoch, t0, ema = 0, 0, time.time(), None
    while step < args.steps:
        blocks = epoch_blocks(dd, corpus, instructions, tokenizer, epoch, args.seed, args.block, 8, 600)
        order = torch.randperm(len(blocks))
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            if step >= args.steps:
                break
            batch = blocks[order[i : i + args.batch_size]]  # [B, block]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            out = model(input_ids=batch, labels=batch, output_router_logits=True)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lm = out.loss.item() - model.config.router_aux_loss_coef * out.aux_loss.item()
            ema = lm if ema is None else 0.95 * ema + 0.05 * lm
            step += 1
            if step % 25 == 0 or step == 1:
                print(
                    f"step {step:5d}  epoch {epoch:3d}  lm {lm:.4f}  ema {ema:.4f}  aux {out.aux_loss.item():.4f}"
                    f"  lr {lr_at(step - 1):.2e}  {time.time() - t0:6.0f}s",
                    flush=True,
                )
        epoch += 1
    print(f"done: {step} steps, {epoch} epochs, {time.time() - t0:.0f}s, final lm loss (ema) {ema:.4f}")

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"saved to {args.out} ({size:,} bytes)")

    world = dd.build_world(data_seed)
    print(f"facts recalled (greedy next word): {fact_accuracy(model, tokenizer, world):.1%} of {len(world.facts)}")
    obj, person = dd.OBJECTS[0], dd.PEOPLE[0]
    prompts = [
        f"The {obj} is",
        f"Where is the {obj}? The {obj} is in the",
        f"{person} is a",
        f"Where does {person} live? {person} lives in",
        "3 + 4 =",
        "twelve minus five is",
        dd.eval_prompt("Repeat the word lamp.", commonsense=False),
    ]
    print(
        f"facts: {obj} colour={world.facts[(obj, 'colour')]} room={world.facts[(obj, 'room')]}; "
        f"{person} job={world.facts[(person, 'job')]} city={world.facts[(person, 'city')]}"
    )
    for prompt in prompts:
        print(f"{prompt[-40:]!r} -> {greedy(model, tokenizer, prompt)!r}")


if __name__ == "__main__":
    main()
