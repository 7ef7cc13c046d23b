"""The evaluation tasks' Hugging Face hub datasets, converted to LLM-Adapters test records byte for byte.

When ``<data-dir>/<task>/test.json`` is missing, ``tasks.load_records`` calls ``hub_test_file``: it loads the task's
hub dataset (the splits LLM-Adapters made its file from), converts each row to an LLM-Adapters record (``instruction``,
``input``, ``output``, ``answer``) and caches the list atomically as ``<cache>/<task>/test.json``, with ``source.json``
(dataset, config, splits, commit) beside it. Later runs read the cache without a hub; the results JSON names it as
``data_file``. The cache has the LLM-Adapters layout (usable as ``--data-dir``); delete a task's folder to redo it.

Environment (read at each call):
- ``PERFT_CACHE``: cache root (default ``$XDG_CACHE_HOME/perft`` or ``~/.cache/perft``); files go to ``tasks/``.
- ``PERFT_HUB_TASKS_DIR``: a local mirror read instead of the hub. ``<dir>/<hub id>`` (e.g. ``<dir>/google/boolq``)
  holds what ``hf download <hub id> --repo-type dataset --local-dir <dir>/<hub id>`` writes; for ybisk/piqa and
  allenai/social_i_qa add ``--revision refs/convert/parquet`` (their main branch is a loading script).
- ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``: no network; only the datasets cache (or the mirror) is read.
Loading scripts are never run (datasets >= 4 cannot, and no ``trust_remote_code`` is passed).

Byte-exactness: for the 12 tasks with a source, the converters give the ``instruction`` and ``answer`` of every record
of LLM-Adapters' test files (``output`` too for commonsense), checked against the real files by
``tests/evaluation/test_hub_converters.py``; hellaswag is the exception (no file was at hand, see ``hellaswag``).
Records follow the hub's order. The commonsense files start with the hub's first rows; the arithmetic files are
shuffled (gsm8k's first hub question, "Janet's ducks", is record 302 of theirs), so example indices differ from theirs
while the examples are the same.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perft_cli.errors import DataError, PerftError
from perft_cli.evaluation.tasks import GET_FILES
from perft_cli.outputs import write_text_atomic

FORMAT = 1  # written to source.json; bump when a converter changes so that older caches are converted again
CACHE_ENV = "PERFT_CACHE"
NOT_BYTE_VERIFIED = frozenset({"hellaswag"})  # converters with no LLM-Adapters file here to check them against
MIRROR_ENV = "PERFT_HUB_TASKS_DIR"
OFFLINE_VARS, TRUE = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"), ("1", "ON", "YES", "TRUE")

Row = dict[str, Any]
Record = dict[str, str]


# --- converters: one hub row -> one LLM-Adapters record --------------------------------------------------------


def _choice(instruction: str, answer: str) -> Record:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def _arith(instruction: str, answer: Any) -> Record:
    # LLM-Adapters' arithmetic outputs are ChatGPT rationales that no hub dataset holds; evaluation ignores them.
    return {"instruction": instruction, "input": "", "output": "", "answer": _number(answer)}


def _number(value: Any) -> str:
    """A gold number as LLM-Adapters writes it, ``str(float(x))``: "72" -> "72.0", 0.6 -> "0.6"."""
    return str(float(str(value).replace(",", "").strip()))


def _index(label: Any, n: int, first: int) -> int:
    """The 0-based gold index of a label counted from ``first``; hub test splits without gold (-1, "") fail here."""
    i = int(str(label).strip()) - first
    if not 0 <= i < n:
        raise ValueError(f"gold label {label!r} is not one of the {n} options")
    return i


def _bool(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # e.g. a JSON Lines mirror
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"gold answer {value!r} is not true/false")
    return value


def _options(tag: str, texts: list[str]) -> tuple[str, str]:
    """(``Tag1: a Tag2: b``, ``tag1/tag2``): LLM-Adapters numbers options from 1, separated by one space."""
    listed = " ".join(f"{tag}{i}: {t}" for i, t in enumerate(texts, 1))
    return listed, "/".join(f"{tag.lower()}{i}" for i in range(1, len(texts) + 1))


def boolq(row: Row) -> Record:
    # google/boolq questions are lower case without "?": LLM-Adapters appends one.
    q = f"Please answer the following question with true or false, question: {row['question']}?"
    return _choice(f"{q}\n\nAnswer format: true/false", "true" if _bool(row["answer"]) else "false")


def piqa(row: Row) -> Record:
    i = _index(row["label"], 2, first=0)
    text = f"Please choose the correct solution to the question: {row['goal']}\n\n"
    text += f"Solution1: {row['sol1']}\n\nSolution2: {row['sol2']}\n\nAnswer format: solution1/solution2"
    return _choice(text, f"solution{i + 1}")


def social_i_qa(row: Row) -> Record:
    listed, fmt = _options("Answer", [row["answerA"], row["answerB"], row["answerC"]])
    text = f"Please choose the correct answer to the question: {row['context']} {row['question']}"
    return _choice(f"{text}\n\n{listed}\n\nAnswer format: {fmt}", f"answer{_index(row['label'], 3, first=1) + 1}")


def hellaswag(row: Row) -> Record:
    """NOT byte-verified here (no LLM-Adapters hellaswag file was available): the form of their published prompts,
    ``<activity_label>: <ctx>`` with the raw ``ctx`` ("[header]"/"[step]" markers kept), four ``EndingN: ...``
    separated by one space, and ``ending1``..``ending4`` as answers."""
    endings = list(row["endings"])
    listed, fmt = _options("Ending", endings)
    text = f"Please choose the correct ending to complete the given sentence: {row['activity_label']}: {row['ctx']}"
    return _choice(f"{text}\n\n{listed}\n\nAnswer format: {fmt}", f"ending{_index(row['label'], len(endings), 0) + 1}")


def winogrande(row: Row) -> Record:
    # No blank line before "Answer format" here, unlike the other tasks (sic, as in the files).
    text = "Please choose the correct answer to fill in the blank to complete the given sentence: "
    text += f"{row['sentence']}\n\nOption1: {row['option1']} Option2: {row['option2']} Answer format: option1/option2"
    return _choice(text, f"option{_index(row['answer'], 2, first=1) + 1}")


def _science(field: str) -> Callable[[Row], Record]:
    """ARC (``question``) and OpenBookQA (``question_stem``): 3 to 5 options labelled A-E or 1-5, numbered from 1."""

    def convert(row: Row) -> Record:
        labels, key = [str(x).strip() for x in row["choices"]["label"]], str(row["answerKey"]).strip()
        if key not in labels:
            raise ValueError(f"answerKey {key!r} is not one of the labels {labels}")
        listed, fmt = _options("Answer", list(row["choices"]["text"]))
        text = f"Please choose the correct answer to the question: {row[field]}\n\n{listed}\n\nAnswer format: {fmt}"
        return _choice(text, f"answer{labels.index(key) + 1}")

    return convert


def gsm8k(row: Row) -> Record:
    # The answer is the number after "####" of the worked solution (commas removed), as a float: "#### 72" -> "72.0".
    if "####" not in row["answer"]:
        raise ValueError("no '#### <number>' in the answer")
    return _arith(row["question"], row["answer"].rsplit("####", 1)[1])


def aqua(row: Row) -> Record:
    # Zero-shot-CoT's construction (Kojima et al.), which LLM-Adapters kept: every "(" of the joined options gets a
    # space before it and every ")" one after it, option text included; hence "(A)  13.3" and "D/ (M-3)  (B)".
    # The question is not stripped and a trailing space after the last option stays.
    choices = ("(" + "(".join(row["options"])).replace("(", " (").replace(")", ") ")
    answer = str(row["correct"]).strip()
    return {"instruction": f"{row['question']} Answer Choices:{choices}", "input": "", "output": "", "answer": answer}


def svamp(row: Row) -> Record:
    # Body + ". " + Question, or one space when Body ends with "." (hence their "cards left.. How": Body ends "..").
    body = row["Body"]
    return _arith(body + (" " if body.endswith(".") else ". ") + row["Question"], row["Answer"])


def multiarith(row: Row) -> Record:
    # The question keeps MultiArith's leading and trailing space; final_ans is a string ("15" -> "15.0").
    return _arith(row["question"], row["final_ans"])


# --- sources ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    """Where a task's test file came from: a hub dataset, its config, the splits (concatenated in this order)."""

    repo: str
    config: str | None
    splits: tuple[str, ...]
    convert: Callable[[Row], Record]
    revision: str | None = None  # a branch of the repository (None: main)

    def describe(self) -> str:
        at = f" @ {self.revision}" if self.revision else ""
        return f"{self.repo}{f' ({self.config})' if self.config else ''} {'+'.join(self.splits)}{at}"


PARQUET = "refs/convert/parquet"  # the hub's automatic Parquet export of a repository whose main is a loading script
# Counts are those of LLM-Adapters' files, which match these splits; test splits without gold labels are not used.
SOURCES: dict[str, HubSource] = {
    "boolq": HubSource("google/boolq", None, ("validation",), boolq),  # 3270
    "piqa": HubSource("ybisk/piqa", None, ("validation",), piqa, revision=PARQUET),  # 1838
    "social_i_qa": HubSource("allenai/social_i_qa", None, ("validation",), social_i_qa, revision=PARQUET),  # 1954
    "hellaswag": HubSource("Rowan/hellaswag", None, ("validation",), hellaswag),  # 10042 (main is Parquet now)
    # Every winogrande size has the same validation split (1267 rows); xl is named because a config is required.
    "winogrande": HubSource("allenai/winogrande", "winogrande_xl", ("validation",), winogrande),
    "ARC-Easy": HubSource("allenai/ai2_arc", "ARC-Easy", ("test",), _science("question")),  # 2376
    "ARC-Challenge": HubSource("allenai/ai2_arc", "ARC-Challenge", ("test",), _science("question")),  # 1172
    "openbookqa": HubSource("allenai/openbookqa", "main", ("test",), _science("question_stem")),  # 500
    "gsm8k": HubSource("openai/gsm8k", "main", ("test",), gsm8k),  # 1319 (their file: the same rows, shuffled)
    "AQuA": HubSource("deepmind/aqua_rat", "raw", ("test",), aqua),  # 254
    # LLM-Adapters' SVAMP and MultiArith files hold the whole datasets (1000, 600); these hub copies split them in
    # train 700 + test 300 and train 420 + test 180, so both splits are concatenated (their files are shuffled).
    "SVAMP": HubSource("ChilleD/SVAMP", None, ("train", "test"), svamp),
    "MultiArith": HubSource("ChilleD/MultiArith", None, ("train", "test"), multiarith),
}
NO_SOURCE = {  # tasks whose LLM-Adapters file has no clean hub counterpart
    "AddSub": "AddSub (395 problems, answers written as in AddSub.json: '4', '9.8') has no hub dataset to convert",
    "SingleEq": "SingleEq (508 problems) has no hub dataset to convert",
}


# --- loading, converting, caching ------------------------------------------------------------------------------


class _Unavailable(Exception):
    """The hub dataset could not be read (the message says why, on one line)."""


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "perft")
    return Path(base).expanduser() / "tasks"


def hub_test_file(name: str, missing: str) -> Path:
    """The converted test file of registry task ``name`` (cached, else converted now); ``missing`` says where the
    LLM-Adapters file was looked for. Every failure is one DataError line ending with how to get the files."""
    target = cache_root() / name / "test.json"
    if _is_current(target):
        return target
    head, hint = f"no test file for task {name!r} ({missing}) and", f"; to get the files: {GET_FILES}"
    src = SOURCES.get(name)
    if src is None:
        raise DataError(f"{head} {NO_SOURCE.get(name, 'no hub dataset is known for it')}{hint}")
    try:
        rows, origin = _load_rows(src)
    except _Unavailable as e:
        raise DataError(f"{head} its hub dataset {src.repo} could not be loaded ({e}){hint}") from None
    records = [_convert(src, i, row) for i, row in enumerate(rows)]
    if not records:
        raise DataError(f"{head} its hub dataset {src.describe()} has no rows{hint}")
    meta = dict(format=FORMAT, task=name, repo=src.repo, config=src.config, splits=list(src.splits), rows=len(records),
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **origin)  # fmt: skip
    try:  # source.json last: it marks the cache complete (an interrupted conversion is done again)
        write_text_atomic(target, json.dumps(records, indent=4, ensure_ascii=False) + "\n")
        write_text_atomic(target.with_name("source.json"), json.dumps(meta, indent=2) + "\n")
    except (OSError, PerftError) as e:
        why = getattr(e, "strerror", None) or e
        raise DataError(f"cannot write {target}: {why}; set {CACHE_ENV} to a writable folder") from None
    from perft_cli.console import info

    info(f"{name}: converted {len(records)} rows of {src.describe()} to LLM-Adapters records: {target}")
    return target


def _convert(src: HubSource, i: int, row: Row) -> Record:
    try:
        return src.convert(row)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DataError(
            f"{src.repo} row {i}: cannot convert it to an LLM-Adapters record ({type(e).__name__}: {_line(e)}); "
            f"to get the files instead: {GET_FILES}"
        ) from None


def _is_current(target: Path) -> bool:
    try:
        return target.is_file() and json.loads(target.with_name("source.json").read_text())["format"] == FORMAT
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _load_rows(src: HubSource) -> tuple[list[Row], dict[str, Any]]:
    """The rows of the source's splits in order, and where they came from (commit or mirror) for source.json."""
    try:
        import datasets
    except ImportError:
        raise _Unavailable("the 'datasets' package is missing: pip install datasets") from None
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        path = Path(mirror).expanduser() / src.repo
        if not path.is_dir():
            raise _Unavailable(f"no copy of it at {path} ({MIRROR_ENV} is set)")
        where, revision, origin = str(path), None, {"mirror": str(path)}
    elif datasets.config.HF_HUB_OFFLINE or any(os.environ.get(v, "").upper() in TRUE for v in OFFLINE_VARS):
        # The datasets cache only (the library refuses the network; it reads the variables when first imported).
        where, revision, origin = src.repo, src.revision, {"revision": src.revision, "offline": True}
    else:  # one request for the commit (no retries: an unreachable hub fails at once); every split is read from it
        from perft_cli import hub

        try:
            revision = hub.repo_info(src.repo, "dataset", src.revision).sha
        except Exception as e:  # no network, unknown repository, gated, ...
            raise _Unavailable(f"{type(e).__name__}: {_line(e)}") from None
        where, origin = src.repo, {"revision": revision}
    rows: list[Row] = []
    for split in src.splits:
        try:
            ds = datasets.load_dataset(where, src.config, split=split, revision=revision)
        except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
            raise _Unavailable(f"split {split!r}: {type(e).__name__}: {_line(e)}") from None
        rows.extend(dict(r) for r in ds)
    return rows, {**origin, "datasets_version": datasets.__version__}


def _line(e: BaseException) -> str:
    """An exception's message on one line (the CLI prints user errors as one line)."""
    return re.sub(r"\s+", " ", str(e)).strip() or type(e).__name__
