"""Batched generation and scoring for the paper's evaluation protocol (method.md).

Prompts are generated in batches with left padding, longest first (a too-large batch fails on the first batch, and
similar lengths waste little padding), as many a batch as a token budget allows (``batches``); the prompts' shared
prefix is computed once and each prompt once rather than once per beam (``prefill``); outputs are put back in the
caller's order. ``evaluate_task`` turns one task's records into scored rows with ``tasks.extract_answer``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from perft_cli.evaluation.tasks import COMMONSENSE, Task, extract_answer, is_correct
from perft_cli.prompts import eval_prompt, response_of

# Decoding of the reference (LLM-Adapters commonsense_evaluate.py / evaluate.py): a fresh GenerationConfig with
# num_beams=4 and everything else at transformers' defaults (early_stopping False; temperature/top_p/top_k are
# ignored without sampling). Pinned explicitly so that a model's generation_config.json cannot change them.
GENERATION = dict(
    do_sample=False,
    early_stopping=False,
    length_penalty=1.0,
    repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    num_return_sequences=1,
)


def batches(
    lengths: list[int], *, batch_size: int | None, batch_tokens: int | None, new_tokens: int, num_beams: int
) -> list[list[int]]:
    """Prompt indices in batches, longest first: ``batch_size`` a batch, else as many as fit in ``batch_tokens``.

    The budget bounds the KV cache a batch ends with: n prompts padded to the longest (the batch's first), L tokens,
    hold n * num_beams * (L + new_tokens) tokens. It sets memory (eval.batch_tokens says how much on a real model);
    a batch always takes one prompt, however long.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the file's order
    if batch_size is not None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if batch_tokens is None:
        raise ValueError("pass batch_size or batch_tokens")
    out: list[list[int]] = []
    for i in order:
        if out and (len(out[-1]) + 1) * num_beams * (lengths[out[-1][0]] + new_tokens) <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def iter_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_beams: int,
    max_new_tokens: int,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    shared_prefill: bool = True,
    shared_prefix: bool = True,
) -> Iterator[list[tuple[int, str]]]:
    """Yield ``[(prompt index, response)]`` batch by batch, longest prompts first (left-padded beam search).

    ``batch_size``: prompts per batch; None: as many as fit in ``batch_tokens`` (``batches``). ``shared_prefill``:
    run the prompt once per example instead of once per beam; ``shared_prefix``: and the prompts' common first
    tokens (the template's header) once for all (``prefill``). Neither changes an answer (tested on several
    families); with 4 new tokens (commonsense) the prompt is most of the work.
    """
    import torch

    from perft_cli.evaluation.prefill import cache_kwarg, cache_reuse, common_prefix, prefill, prefix_cache

    tokenizer.padding_side = "left"  # generation continues from the last column, so padding goes on the left
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    device = model.get_input_embeddings().weight.device
    eos = model.generation_config.eos_token_id
    reuse = cache_reuse(model) if shared_prefill else "none"
    prefix = None
    if reuse == "prefix" and shared_prefix and len(ids) > 1:
        prefix = prefix_cache(model, ids[0][: common_prefix(ids)])
    sizing = dict(batch_size=batch_size, batch_tokens=batch_tokens, new_tokens=max_new_tokens, num_beams=num_beams)
    for idx in batches([len(x) for x in ids], **sizing):
        batch = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(device)  # [B, S]
        with torch.inference_mode():
            cache = prefill(model, batch, num_beams, prefix) if reuse != "none" else None
            # position_ids follow the attention mask (generate derives them), so padding does not shift positions.
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                **({cache_kwarg(): cache} if cache is not None else {}),
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
                **GENERATION,
            )  # [B, S + new]
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        yield [(i, response_of(t)) for i, t in zip(idx, texts, strict=True)]


def generate_responses(model, tokenizer, prompts: list[str], **kwargs: Any) -> list[str]:
    """Responses to ``prompts`` in their order (see ``iter_responses`` for the keyword arguments)."""
    responses = [""] * len(prompts)
    for batch in iter_responses(model, tokenizer, prompts, **kwargs):
        for i, text in batch:
            responses[i] = text
    return responses


def evaluate_task(
    model,
    tokenizer,
    task: Task,
    records: list[dict],
    *,
    num_beams: int,
    max_new_tokens: int,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Generate, extract and score every record; one row per example, in the file's order."""
    prompts = [eval_prompt(r["instruction"], r["input"], commonsense=task.kind == COMMONSENSE) for r in records]
    rows: list[dict | None] = [None] * len(records)
    done = correct = 0
    sizing = dict(batch_size=batch_size, batch_tokens=batch_tokens)
    for batch in iter_responses(
        model, tokenizer, prompts, num_beams=num_beams, max_new_tokens=max_new_tokens, **sizing
    ):
        for i, text in batch:
            pred = extract_answer(task, text)
            ok = is_correct(task, pred, records[i]["answer"])
            rows[i] = dict(
                task=task.name, index=i, prompt=prompts[i], generated=text, prediction=pred,
                gold=records[i]["answer"], correct=ok,
            )  # fmt: skip
            correct += ok
        done += len(batch)
        if on_batch:
            on_batch(done, correct)
    return rows  # type: ignore[return-value]
