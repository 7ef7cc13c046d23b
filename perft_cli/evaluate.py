"""``perft eval``: the paper's evaluation protocol (method.md), batched, plus an lm-evaluation-harness mode.

Generation protocol: the LLM-Adapters evaluation prompt byte for byte (``prompts.eval_prompt``), deterministic 4-beam
search, 4 new tokens for commonsense and 256 for arithmetic, the text after the last "### Response:", and the exact
extraction rules of ``tasks.extract_answer``. Prompts are generated in batches with left padding, longest first
(a too-large batch fails on the first batch, and similar lengths waste little padding), each prompt run once rather
than once per beam; outputs are put back in the file's order. Results go to a JSON file (with the protocol settings,
recipe and checkpoint) and a JSON Lines file with every example; the rich table on stdout is presentation only.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from perft_cli.errors import PerftError
from perft_cli.prompts import eval_prompt, response_of
from perft_cli.tasks import (
    ARITHMETIC,
    ARITHMETIC_TASKS,
    COMMONSENSE,
    COMMONSENSE_TASKS,
    TASKS,
    Task,
    extract_answer,
    is_correct,
    known_task,
    load_records,
    resolve_tasks,
)

__all__ = ["extract_answer", "generate_responses", "run_eval"]

PROMPT_TEMPLATE = "llm-adapters-eval"  # prompts.eval_prompt; its bytes are hashed into the results JSON
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
LM_EVAL_NAMES = {  # our task names -> lm-evaluation-harness task names
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "social_iqa",
    "hellaswag": "hellaswag",
    "winogrande": "winogrande",
    "ARC-Easy": "arc_easy",
    "ARC-Challenge": "arc_challenge",
    "openbookqa": "openbookqa",
    "gsm8k": "gsm8k",
}
LM_EVAL_INSTALL = "--mode lm-eval needs lm-evaluation-harness: pip install 'perft-cli[lm-eval]'"


# --- generation ------------------------------------------------------------------------------------------------


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
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(device)  # [B, S]
        with torch.inference_mode():
            cache = _prefill(model, batch, num_beams) if shared_prefill else None
            # position_ids follow the attention mask (generate derives them), so padding does not shift positions.
            out = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                past_key_values=cache,
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
    cache = getattr(out, "past_key_values", None)
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


# --- the command -----------------------------------------------------------------------------------------------


def run_eval(
    *,
    ckpt: str | Path | None = None,
    tasks: list[str] | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    base: bool = False,
    json_path: str | Path | None = None,
    recipe_path: str | Path | None = None,
    overrides: list[str] | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    mode: str = "generation",
) -> dict[str, Any]:
    """Evaluate a checkpoint (or the frozen base) and write the results JSON (+ per-example JSON Lines)."""
    from perft_cli.checkpoint import load_trained

    if mode not in ("generation", "lm-eval"):
        raise PerftError(f"--mode {mode!r}: expected 'generation' (the paper's protocol) or 'lm-eval'")
    if mode == "lm-eval":
        _require_lm_eval()  # before minutes of model loading
    recipe, ckpt_path = _recipe(ckpt, recipe_path, base, overrides or [])
    cfg = recipe.eval
    limit = limit or cfg.limit
    batch_size = batch_size or cfg.batch_size
    max_new_tokens = max_new_tokens or cfg.max_new_tokens  # None: each task's default
    names = tasks or cfg.tasks or _default_tasks(recipe, mode)
    data_dir = data_dir or cfg.data_dir
    if mode == "generation":  # read (and check) the data before loading the model
        loaded = [load_records(t, folder, data_dir) for t, folder in resolve_tasks(names, data_dir)]
    model, tokenizer, recipe, _, _ = load_trained(ckpt_path, base=base, recipe=recipe)
    _place(model)
    json_file = Path(json_path) if json_path else _default_json(ckpt_path, recipe, base, mode)
    json_file.parent.mkdir(parents=True, exist_ok=True)
    examples_file = json_file.with_name(json_file.stem + ".examples.jsonl")
    started = time.time()
    if mode == "lm-eval":
        result = _run_lm_eval(model, tokenizer, names, batch_size=batch_size, limit=limit)
    else:
        settings = dict(batch_size=batch_size, num_beams=cfg.num_beams, max_new_tokens=max_new_tokens)
        result = _run_generation(model, tokenizer, loaded, examples_file, limit=limit, **settings)
        result["examples_file"] = str(examples_file)
    result.update(
        checkpoint=str(ckpt_path) if ckpt_path else None,
        adapted=not base,
        model=recipe.model.name_or_path,
        quantization=recipe.model.quantization,
        limit=limit,
        seconds=round(time.time() - started, 2),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        versions=_versions(),
        recipe=recipe.model_dump(mode="json"),
    )
    json_file.write_text(json.dumps(result, indent=2) + "\n")
    result["json_file"] = str(json_file)
    _print_table(result)
    from perft_cli.console import info

    info(f"results: {json_file}" + (f"\nper-example outputs: {examples_file}" if mode == "generation" else ""))
    return result


def _with_progress(model, tokenizer, task: Task, records: list[dict], **kwargs: Any) -> list[dict]:
    """``evaluate_task`` under a rich progress bar (stderr, rank 0) that shows the running accuracy."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from perft_cli.console import err, is_main_process

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}"),
    )
    with Progress(*columns, TimeRemainingColumn(), console=err, disable=not is_main_process()) as progress:
        bar = progress.add_task(f"{task.name:<13}", total=len(records), acc="-")  # aligned: ARC-Challenge

        def update(done: int, correct: int) -> None:
            progress.update(bar, completed=done, acc=f"{100 * correct / done:.1f}%")

        return evaluate_task(model, tokenizer, task, records, on_batch=update, **kwargs)


def _run_generation(model, tokenizer, loaded, examples_file: Path, *, limit, batch_size, num_beams, max_new_tokens):
    from perft_cli.console import warn

    per_task: dict[str, dict] = {}
    max_tokens: dict[str, int] = {}
    with examples_file.open("w") as fh:
        for task, records, path in loaded:
            if task.expected and len(records) != task.expected:
                warn(f"{path} has {len(records)} examples; the paper's {task.name} test set has {task.expected}")
            full = len(records)
            records = records[:limit] if limit else records
            max_tokens[task.name] = max_new_tokens or task.max_new_tokens
            started = time.time()
            rows = _with_progress(
                model, tokenizer, task, records, batch_size=batch_size, num_beams=num_beams,
                max_new_tokens=max_tokens[task.name],
            )  # fmt: skip
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            n, correct = len(rows), sum(r["correct"] for r in rows)
            seconds = time.time() - started
            per_task[task.name] = dict(
                kind=task.kind, examples=n, correct=correct, accuracy=correct / n, expected_examples=task.expected,
                complete=n == full and n == (task.expected or n), custom=task.custom, data_file=str(path),
                seconds=round(seconds, 2), examples_per_s=round(n / seconds, 3) if seconds else None,
            )  # fmt: skip
    return dict(
        protocol="generation",
        protocol_note="the paper's protocol (LLM-Adapters prompts, beam search, answer extraction): comparable "
        "with published PERFT / LLM-Adapters numbers on the full test sets",
        settings=dict(
            prompt_template=PROMPT_TEMPLATE,
            prompt_template_sha256={k: _template_sha(k == COMMONSENSE) for k in (COMMONSENSE, ARITHMETIC)},
            num_beams=num_beams,
            batch_size=batch_size,
            padding_side="left",
            max_new_tokens=max_tokens,
            answer_rules={task.name: task.rule for task, _, _ in loaded},
            **GENERATION,
        ),
        tasks=per_task,
        averages={kind: _mean(per_task, kind) for kind in (COMMONSENSE, ARITHMETIC)},
    )


def _mean(per_task: dict[str, dict], kind: str) -> float | None:
    """Unweighted mean over the tasks of one kind that were evaluated (method.md), None if there are none."""
    accs = [t["accuracy"] for t in per_task.values() if t["kind"] == kind]
    return sum(accs) / len(accs) if accs else None


def _template_sha(commonsense: bool) -> str:
    return hashlib.sha256(eval_prompt("{instruction}", "", commonsense).encode()).hexdigest()


# --- lm-evaluation-harness -------------------------------------------------------------------------------------


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError:
        raise PerftError(LM_EVAL_INSTALL) from None


def _run_lm_eval(model, tokenizer, names: list[str], *, batch_size: int, limit: int | None) -> dict:
    """Log-likelihood scoring of lm-eval tasks on the loaded model (adapters attached): a different protocol."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm_names = [LM_EVAL_NAMES.get(t.name, n) if (t := known_task(n)) else n for n in names]
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), tasks=lm_names, limit=limit
    )
    per_task = {}
    for name, metrics in (out or {}).get("results", {}).items():
        scores = {k.replace(",none", ""): v for k, v in metrics.items() if isinstance(v, int | float) and "," in k}
        n = (out.get("n-samples") or {}).get(name, {}).get("effective")
        per_task[name] = dict(examples=n, accuracy=scores.get("acc"), acc_norm=scores.get("acc_norm"), metrics=scores)
    return dict(
        protocol="lm-eval",
        protocol_note="lm-evaluation-harness log-likelihood scoring: NOT comparable with the generation protocol "
        "(the paper's numbers)",
        settings=dict(batch_size=batch_size, lm_eval_tasks=lm_names, lm_eval_version=_version("lm-eval")),
        tasks=per_task,
    )


# --- plumbing --------------------------------------------------------------------------------------------------


def _recipe(ckpt, recipe_path, base: bool, overrides: list[str]):
    """The recipe to evaluate with (the checkpoint's, or --recipe with --base), ``--set`` overrides applied."""
    import yaml

    from perft_cli.checkpoint import load_checkpoint_recipe, resolve_checkpoint
    from perft_cli.config import apply_override, load_recipe, recipe_from_dict

    if ckpt is None:
        if recipe_path is None:
            raise PerftError("pass --ckpt DIR (a run or checkpoint directory), or --base --recipe R.yaml")
        if not base:
            raise PerftError("--recipe without --ckpt evaluates the frozen model only: add --base (or pass --ckpt)")
        return load_recipe(recipe_path, overrides), None
    if recipe_path is not None:
        raise PerftError("pass --ckpt or --recipe, not both (change the checkpoint's recipe with --set KEY=VALUE)")
    path = resolve_checkpoint(ckpt)
    recipe = load_checkpoint_recipe(path)
    if overrides:
        raw = yaml.safe_load(recipe.to_yaml())
        for assignment in overrides:
            apply_override(raw, assignment)
        recipe = recipe_from_dict(raw, f"checkpoint recipe {path} with --set", base=Path.cwd())
    return recipe, path


def _default_tasks(recipe, mode: str) -> list[str]:
    train = (recipe.data.train or "").lower()
    if "commonsense" in train or mode == "lm-eval":
        return list(COMMONSENSE_TASKS)
    if "math" in train:
        return list(ARITHMETIC_TASKS)
    raise PerftError(f"no tasks to evaluate: pass --tasks a,b or set eval.tasks (known: {', '.join(TASKS)})")


def _default_json(ckpt_path: Path | None, recipe, base: bool, mode: str) -> Path:
    """RUN/eval/<checkpoint>-<adapted|base>-<time>.json for a run's checkpoint, else beside the checkpoint."""
    tag = ("base" if base else "adapted") + ("-lm-eval" if mode == "lm-eval" else "")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if ckpt_path is None:
        return Path(recipe.output_dir or "runs/base") / "eval" / f"{tag}-{stamp}.json"
    if ckpt_path.parent.name == "checkpoints":
        return ckpt_path.parent.parent / "eval" / f"{ckpt_path.name}-{tag}-{stamp}.json"
    return ckpt_path / "eval" / f"{tag}-{stamp}.json"


def _place(model) -> None:
    """A model loaded without a device map sits on the CPU: move it to the GPU when there is one."""
    import torch

    if torch.cuda.is_available() and not getattr(model, "hf_device_map", None) and model.device.type == "cpu":
        model.to("cuda")


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _versions() -> dict[str, str | None]:
    return {d: _version(d) for d in ("perft-cli", "torch", "transformers", "peft")}


def _print_table(result: dict) -> None:
    from rich.table import Table

    from perft_cli.console import is_main_process, out

    if not is_main_process():
        return
    lm = result["protocol"] == "lm-eval"
    title = "lm-evaluation-harness, log-likelihood (NOT comparable with the paper)" if lm else "generation protocol"
    who = "adapted " + str(result["checkpoint"]) if result["adapted"] else f"base {result['model']}"
    table = Table(title=f"perft eval: {who}\n{title}", caption=result["protocol_note"] if lm else None)
    for col in ("task", "kind", "examples", "accuracy %") + (("acc_norm %",) if lm else ()):
        table.add_column(col, justify="left" if col in ("task", "kind") else "right")
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
    for name, t in result["tasks"].items():
        limited = "" if lm or t["complete"] else " *"
        extra = (pct(t["acc_norm"]),) if lm else ()
        table.add_row(name, t.get("kind", "-"), f"{t['examples']}{limited}", pct(t["accuracy"]), *extra)
    averages = {k: v for k, v in (result.get("averages") or {}).items() if v is not None}
    if averages:
        table.add_section()
    for kind, acc in averages.items():
        n = sum(t["kind"] == kind for t in result["tasks"].values())
        table.add_row(f"[bold]average {kind}[/]", f"{n} task{'s' * (n > 1)}", "", f"[bold]{pct(acc)}[/]")
    if not lm and any(not t["complete"] for t in result["tasks"].values()):
        table.caption = "* not the paper's full test set: not comparable with published numbers"
    out.print(table)
