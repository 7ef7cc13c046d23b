"""Batched generation and scoring for the paper's evaluation protocol (method.md).

Prompts are generated in batches with left padding, longest first (a too-large batch fails on the first batch, and
similar lengths waste little padding), each prompt run once rather than once per beam; outputs are put back in the
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


def _cache_kwarg() -> str:
    """generate()'s name for a ready KV cache: ``cache`` from transformers 5.2x (``past_key_values`` warns there)."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def iter_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    batch_size: int,
    num_beams: int,
    max_new_tokens: int,
    shared_prefill: bool = True,
) -> Iterator[list[tuple[int, str]]]:
    """Yield ``[(prompt index, response)]`` batch by batch, longest prompts first (left-padded beam search).

    ``shared_prefill``: run the prompt once per example instead of once per beam (see ``_prefill``); the answers
    are the same (tested on every family), generation is 2-4x faster when the prompt dominates (commonsense).
    """
    import torch

    tokenizer.padding_side = "left"  # generation continues from the last column, so padding goes on the left
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))  # stable: ties keep the file's order
    device = model.get_input_embeddings().weight.device
    eos = model.generation_config.eos_token_id
    cache_kwarg = _cache_kwarg()
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(device)  # [B, S]
        with torch.inference_mode():
            cache = _prefill(model, batch, num_beams) if shared_prefill else None
            # position_ids follow the attention mask (generate derives them), so padding does not shift positions.
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                **({cache_kwarg: cache} if cache is not None else {}),
                num_beams=num_beams,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
                **GENERATION,
            )  # [B, S + new]
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        yield [(i, response_of(t)) for i, t in zip(idx, texts, strict=True)]


def _prefill(model, batch, num_beams: int):
    """The KV cache of all prompt tokens but the last, computed once and repeated for each beam (or None).

    generate() expands the prompt to B * num_beams rows before its first forward, so the prompt (most of the cost
    with 4 new tokens) would run num_beams times. generate() then processes only the last prompt token, from this
    cache; positions are computed from the attention mask exactly as generate() does.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]  # [B, S]
    if num_beams == 1 or ids.shape[1] < 2 or model.generation_config.cache_implementation not in (None, "dynamic"):
        return None
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # [B, S], as generate() derives them
    out = model(
        input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
        logits_to_keep=1,
    )  # fmt: skip
    # transformers 5.2x names it ``cache`` (reading ``past_key_values`` logs a deprecation); older 5.x the other way.
    cache = getattr(out, "cache", None) if hasattr(type(out), "cache") or "cache" in out else None
    cache = cache if cache is not None else out.get("past_key_values")
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(num_beams)  # [B * num_beams, ...], the row order of generate()'s expansion
    return cache


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
    batch_size: int,
    num_beams: int,
    max_new_tokens: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Generate, extract and score every record; one row per example, in the file's order."""
    prompts = [eval_prompt(r["instruction"], r["input"], commonsense=task.kind == COMMONSENSE) for r in records]
    rows: list[dict | None] = [None] * len(records)
    done = correct = 0
    for batch in iter_responses(
        model, tokenizer, prompts, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens
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
