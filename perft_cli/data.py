"""Records -> prompts -> tokens with labels, the held-out split, and the batch order of every epoch.

Sources: an LLM-Adapters JSON file (a list of ``instruction``/``input``/``output``/``answer`` records), JSON Lines
with the same fields, or a Hugging Face dataset by hub id (``data.fields`` maps our field names to its columns).
Every record is checked before training starts; a bad one is a one-line DataError naming the file, the record and
the field. Tokenisation follows the LLM-Adapters reference (``finetune.py``: ``tokenize`` and
``generate_and_tokenize_prompt``). The batch order is a pure function of (seed, epoch), so a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perft_cli.config import DataConfig
from perft_cli.errors import DataError
from perft_cli.prompts import train_prompt

FIELDS = ("instruction", "input", "output", "answer")
REQUIRED = ("instruction", "output")
IGNORE_INDEX = -100  # label of tokens without loss (prompt with train_on_inputs=false, padding)
LENGTH_GROUP = 50  # group_by_length: sort within windows of 50 global batches (transformers' LengthGroupedSampler)


@dataclass
class Examples:
    """Tokenised examples: token ids and labels per example (lists of ints, unpadded)."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def subset(self, index) -> Examples:
        return Examples([self.input_ids[i] for i in index], [self.labels[i] for i in index])


# ---------------------------------------------------------------------------------------------------------------
# Reading and checking records


def source_format(cfg: DataConfig) -> str:
    """json | jsonl | hub: the recipe's ``data.format``, or guessed from the path (an existing file, a suffix)."""
    if cfg.format != "auto":
        return cfg.format
    name = cfg.train or ""
    path = Path(name).expanduser()
    if path.suffix == ".jsonl":
        return "jsonl"
    if path.suffix == ".json" or path.is_file():
        return "json"  # read_json_records falls back to JSON Lines when the file is not one JSON document
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return "json"  # a directory or a mistyped local path: the reader names it
    return "hub"


def read_records(cfg: DataConfig) -> tuple[list[dict[str, str]], str]:
    """All records of ``data.train``, checked and normalised to instruction/input/output/answer strings.

    Returns (records, source name for messages). Raises DataError on any problem, before tokenisation.
    """
    if not cfg.train:
        raise DataError("data.train is not set; point it at an LLM-Adapters JSON/JSONL file or a hub dataset id")
    fmt = source_format(cfg)
    if fmt == "hub":
        raw, source = _read_hub(cfg), f"hub dataset {cfg.train} ({cfg.split})"
    else:
        path = Path(cfg.train).expanduser()
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "not found"
            raise DataError(f"data file {cfg.train!r} {what}; check data.train")
        raw = _read_jsonl(path) if fmt == "jsonl" else _read_json(path)
        source = str(path)
    if not raw:
        raise DataError(f"{source} holds no records; a dataset needs at least one instruction/output record")
    fields = {f: (cfg.fields or {}).get(f, f) for f in FIELDS}
    return [check_record(r, i, source, fields) for i, r in enumerate(raw)], source


def _read_json(path: Path) -> list[Any]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path)  # JSON Lines saved as .json
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]  # {"data": [...]} as some exporters write it
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (LLM-Adapters format), got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[Any]:
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON (column {e.colno}: {e.msg})") from None
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); is it a JSON file?") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _read_hub(cfg: DataConfig) -> list[Any]:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a hub dataset needs the 'datasets' package: pip install datasets") from None
    from perft_cli import hub

    why = hub.probe(cfg.train, "dataset")  # one request; offline (cache only) from then on if the network fails
    try:
        ds = datasets.load_dataset(cfg.train, split=cfg.split)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        if why:
            reason = f"the hub cannot be reached ({why}) and it is not in the datasets cache"
        else:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"cannot load hub dataset {cfg.train!r} (split {cfg.split!r}): {reason}. Without hub access, save it as "
            "JSON/JSONL elsewhere and point data.train at the file"
        ) from None
    return [dict(r) for r in ds]


def check_record(record: Any, index: int, source: str, fields: dict[str, str]) -> dict[str, str]:
    """One record as instruction/input/output/answer strings, or a DataError naming source, record and field."""
    where = f"{source}: record {index + 1}"  # 1-based, as a person counts them
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, expected an object with instruction/output fields")
    out = {}
    for name in FIELDS:
        key = fields[name]
        value = record.get(key)
        if value is None:
            if name in REQUIRED:
                raise DataError(f"{where}: field {key!r} is missing (records need {' and '.join(REQUIRED)})")
            value = ""
        if not isinstance(value, str):
            if name == "answer" and isinstance(value, int | float):
                value = str(value)  # arithmetic answers are often numbers
            else:
                raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        if name in REQUIRED and not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tokenising


def tokenize(records: list[dict[str, str]], tokenizer, cfg: DataConfig) -> Examples:
    """The LLM-Adapters training prompt, truncated to ``cutoff_len``, EOS appended when it fits (reference).

    With ``train_on_inputs: false`` the prompt's tokens get label -100, so the loss covers the response only.
    """
    full = _encode([train_prompt(r["instruction"], r["input"], r["output"]) for r in records], tokenizer, cfg)
    eos = tokenizer.eos_token_id
    if cfg.add_eos and eos is not None:
        for ids in full:
            # Reference: if ids[-1] != eos and len(ids) < cutoff_len and add_eos_token: append eos.
            if ids and ids[-1] != eos and len(ids) < cfg.cutoff_len:
                ids.append(eos)
    labels = [list(ids) for ids in full]
    if not cfg.train_on_inputs:
        prompts = _encode([train_prompt(r["instruction"], r["input"], "") for r in records], tokenizer, cfg)
        for lab, prompt in zip(labels, prompts, strict=True):
            n = min(len(prompt), len(lab))
            lab[:n] = [IGNORE_INDEX] * n
    return Examples(full, labels)


def _encode(texts: list[str], tokenizer, cfg: DataConfig) -> list[list[int]]:
    # One batched call: fast tokenizers encode in Rust, about 100x faster than a Python loop over records.
    return [list(ids) for ids in tokenizer(texts, truncation=True, max_length=cfg.cutoff_len)["input_ids"]]


# ---------------------------------------------------------------------------------------------------------------
# Held-out split and batch order


def split_indices(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: the same permutation as datasets' ``train_test_split(test_size=val_size, seed=seed)``.

    datasets draws ``np.random.default_rng(seed).permutation(n)`` and takes the first ``val_size`` as the test set;
    the reference's 120 held-out examples (seed 42) are therefore exactly ours.
    """
    if val_size == 0:
        return np.arange(n), np.arange(0)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[val_size:], perm[:val_size]


def check_split(n: int, cfg: DataConfig, source: str) -> None:
    """``data.val_size`` must leave records to train on."""
    if cfg.val_size >= n:
        raise DataError(
            f"{source} has {n} records and data.val_size={cfg.val_size} would leave none for training; "
            "lower data.val_size"
        )


def load_examples(cfg: DataConfig, tokenizer) -> tuple[Examples, Examples, str]:
    """Read, check, tokenise and split ``data.train``: (train, val, source)."""
    records, source = read_records(cfg)
    check_split(len(records), cfg, source)
    examples = tokenize(records, tokenizer, cfg)
    train_idx, val_idx = split_indices(len(records), cfg.val_size, cfg.val_seed)
    return examples.subset(train_idx), examples.subset(val_idx), source


def epoch_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """The global batches (example indices) of one epoch, a pure function of (seed, epoch).

    The last incomplete batch is dropped so that every process always gets the same number of micro-batches
    (an uneven last batch would leave a data-parallel rank without work and hang the gradient all-reduce).
    With ``group_by_length`` examples of similar length share a batch (less padding): windows of LENGTH_GROUP
    batches are sorted by length, then the batches are shuffled so the length order does not show in the loss.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)  # independent of the global RNG state
    order = torch.randperm(len(lengths), generator=gen).tolist()
    order = order[: len(order) - len(order) % batch_size]  # drop at random, not the shortest after grouping
    if group_by_length:
        window = batch_size * LENGTH_GROUP
        order = [
            i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lambda j: -lengths[j])
        ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


def rank_micro_batches(batch: list[int], rank: int, world: int, micro_batch_size: int) -> list[list[int]]:
    """This process's micro-batches of one global batch: a contiguous 1/world share, cut into micro-batches."""
    share = len(batch) // world
    mine = batch[rank * share : (rank + 1) * share]
    return [mine[s : s + micro_batch_size] for s in range(0, len(mine), micro_batch_size)]


def collate(examples: Examples, index: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids [B, S], attention_mask [B, S] (0 on padding), labels [B, S] (-100 on padding).

    Right padding, unlike the reference's left padding: real tokens keep the positions they have unpadded, which
    matters for families that do not derive position ids from the attention mask during training.
    """
    seqs = [examples.input_ids[i] for i in index]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, S]
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, S]
    for row, i in enumerate(index):
        n = len(examples.input_ids[i])
        input_ids[row, :n] = torch.tensor(examples.input_ids[i])
        labels[row, :n] = torch.tensor(examples.labels[i])
        mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def fingerprint(examples: Examples) -> str:
    """A short hash of the tokenised training set, to warn when a resumed run reads different data."""
    import hashlib

    h = hashlib.sha1()
    for ids in examples.input_ids:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]
