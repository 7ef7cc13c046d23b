"""The evaluation tasks of method.md: names, aliases, label sets, answer extraction and test-file loading.

Pure Python (no torch): the scoring rules here are the paper's protocol (LLM-Adapters ``commonsense_evaluate.py``
and ``evaluate.py``) and are pinned by tests, so that our accuracies are comparable with published ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from perft_cli.errors import DataError, PerftError
from perft_cli.prompts import response_of

COMMONSENSE = "commonsense"
ARITHMETIC = "arithmetic"
DEFAULT_MAX_NEW_TOKENS = {COMMONSENSE: 4, ARITHMETIC: 256}  # PERFT: 4 (LLM-Adapters used 32) / 256
ARITH_TOLERANCE = 0.001  # LLM-Adapters evaluate.py: correct iff |pred - gold| <= 0.001
NUMBER = re.compile(r"-?\d+\.?\d*")  # LLM-Adapters extract_answer_number, applied after removing commas
LETTER = re.compile(r"A|B|C|D|E")  # LLM-Adapters extract_answer_letter: first capital A-E anywhere (sic)
GET_FILES = "git clone https://github.com/AGI-Edgerunners/LLM-Adapters, then pass --data-dir LLM-Adapters/dataset"


@dataclass(frozen=True)
class Task:
    """One evaluation task: its folder name, kind, label set (commonsense) and the paper's example count."""

    name: str
    kind: str  # COMMONSENSE | ARITHMETIC
    labels: tuple[str, ...] = ()  # commonsense: the regex alternatives, in the reference's order
    letters: bool = False  # AQuA: the answer is a letter A-E, not a number
    expected: int | None = None  # examples in the paper's test file (method.md)
    aliases: tuple[str, ...] = ()
    custom: bool = False  # not in the registry: kind and labels inferred from the test file

    @property
    def max_new_tokens(self) -> int:
        return DEFAULT_MAX_NEW_TOKENS[self.kind]

    @property
    def pattern(self) -> re.Pattern[str]:
        # Longest first, so "answer10" is not read as "answer1" (same order as the reference for <= 9 labels).
        return re.compile("|".join(re.escape(x) for x in sorted(self.labels, key=len, reverse=True)))

    @property
    def rule(self) -> str:
        """The extraction rule in words, written into the results JSON."""
        if self.kind == COMMONSENSE:
            return f"first case-sensitive match of {'|'.join(self.labels)}; equal to the gold label"
        if self.letters:
            return "first capital A-E anywhere in the response; equal to the gold letter"
        return rf"commas removed, last match of -?\d+\.?\d* as float; |pred - gold| <= {ARITH_TOLERANCE}"


def _answers(n: int) -> tuple[str, ...]:
    return tuple(f"answer{i}" for i in range(1, n + 1))


# fmt: off
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("boolq", COMMONSENSE, ("true", "false"), expected=3270),
    Task("piqa", COMMONSENSE, ("solution1", "solution2"), expected=1838),
    Task("social_i_qa", COMMONSENSE, _answers(5), expected=1954, aliases=("siqa", "social_iqa", "socialiqa")),
    Task("hellaswag", COMMONSENSE, ("ending1", "ending2", "ending3", "ending4"), expected=10042, aliases=("hs",)),
    Task("winogrande", COMMONSENSE, ("option1", "option2"), expected=1267, aliases=("wg", "wino")),
    Task("ARC-Easy", COMMONSENSE, _answers(5), expected=2376, aliases=("arc-e", "arce", "arc_easy")),
    Task("ARC-Challenge", COMMONSENSE, _answers(5), expected=1172, aliases=("arc-c", "arcc", "arc_challenge")),
    Task("openbookqa", COMMONSENSE, _answers(5), expected=500, aliases=("obqa", "openbook_qa")),
    Task("gsm8k", ARITHMETIC, expected=1319, aliases=("gsm",)),
    Task("SVAMP", ARITHMETIC, expected=1000),
    Task("AddSub", ARITHMETIC, expected=395),
    Task("MultiArith", ARITHMETIC, expected=600),
    Task("SingleEq", ARITHMETIC, expected=508),
    Task("AQuA", ARITHMETIC, letters=True, expected=254, aliases=("aqua_rat", "aquarat")),
)}
# fmt: on
COMMONSENSE_TASKS = [t for t in TASKS if TASKS[t].kind == COMMONSENSE]
ARITHMETIC_TASKS = [t for t in TASKS if TASKS[t].kind == ARITHMETIC]


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


_BY_ALIAS = {_norm(a): t for t in TASKS.values() for a in (t.name, *t.aliases)}


def known_task(name: str) -> Task | None:
    """The registry task for a name or alias (case-insensitive, ``-``/``_`` ignored), else None."""
    return _BY_ALIAS.get(_norm(name))


def _unknown(name: str) -> PerftError:
    return PerftError(
        f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or put a custom task at <data-dir>/{name}/test.json)"
    )


# --- answer extraction (the protocol) ------------------------------------------------------------------------


def extract_answer(task: str | Task, text: str) -> str | float | None:
    """The answer in a response: a label (commonsense, AQuA letter), a float (arithmetic) or None (no match).

    ``text`` may be the whole decoded output: only what follows the last "### Response:" is read (method.md), so the
    prompt's own words ("Answer format: true/false", numbers in the question) never count as the answer.
    """
    t = task if isinstance(task, Task) else known_task(task)
    if t is None:
        raise _unknown(str(task))
    text = response_of(text)
    if t.kind == COMMONSENSE:
        m = t.pattern.search(text)  # the FIRST match (reference: re.findall(...)[0])
        return m.group(0) if m else None
    if t.letters:
        m = LETTER.search(text)
        return m.group(0) if m else None
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None  # the LAST number


def is_correct(task: Task, pred: str | float | None, gold: str) -> bool:
    if pred is None:
        return False
    if task.kind == COMMONSENSE or task.letters:
        return pred == gold
    return abs(pred - float(gold)) <= ARITH_TOLERANCE


# --- test files ------------------------------------------------------------------------------------------------

_LABEL_FAMILY = re.compile(r"^(option|answer|solution|ending)(\d+)$")


def _find_dir(data_dir: Path, task: Task | str) -> Path | None:
    """``<data_dir>/<name>``, or a folder whose name differs only in case / ``-`` / ``_`` (e.g. ``arc-easy``)."""
    name = task.name if isinstance(task, Task) else task
    if (data_dir / name / "test.json").is_file():
        return data_dir / name
    if data_dir.is_dir():
        for d in sorted(data_dir.iterdir()):
            if (d / "test.json").is_file() and (_norm(d.name) == _norm(name) or known_task(d.name) is task):
                return d
    return None


def infer_task(name: str, answers: list[str], where: str) -> Task:
    """A custom task's kind and label set, from its gold answers (numbers, A-E, or optionN-style labels)."""
    if all(_is_number(a) for a in answers):
        return Task(name, ARITHMETIC, custom=True)
    if all(a in ("A", "B", "C", "D", "E") for a in answers):
        return Task(name, ARITHMETIC, letters=True, custom=True)
    if set(answers) <= {"true", "false"}:
        return Task(name, COMMONSENSE, ("true", "false"), custom=True)
    found = [_LABEL_FAMILY.match(a) for a in answers]
    families = {m.group(1) for m in found if m}
    if all(found) and len(families) == 1:
        # The whole family up to the largest label seen: a label that no gold answer uses is still a valid guess.
        family, top = families.pop(), max(int(m.group(2)) for m in found)
        return Task(name, COMMONSENSE, tuple(f"{family}{i}" for i in range(1, top + 1)), custom=True)
    odd = next(a for a in answers if not _LABEL_FAMILY.match(a) and not _is_number(a))
    raise DataError(
        f"{where}: cannot tell the kind of custom task {name!r} from its answers (e.g. {odd!r}); answers must be "
        "all numbers, all A-E, true/false, or labels like option1/answer1/solution1/ending1"
    )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def resolve_tasks(
    names: list[str], data_dir: str | Path | None, option: str = "--data-dir"
) -> list[tuple[Task, Path | None]]:
    """Registry tasks by name or alias, or custom tasks found as ``<data_dir>/<name>/test.json``; duplicates go.

    ``option`` names where ``data_dir`` came from (``--data-dir`` or ``eval.data_dir``) in the error when the folder
    does not exist: a mistyped folder is then said to be missing, not every task in it unknown.
    """
    root = Path(data_dir).expanduser() if data_dir else None
    if root is not None and not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(
            f"{option} {str(data_dir)!r} {what}; pass the folder that holds the <task>/test.json files "
            "(--data-dir DIR, e.g. LLM-Adapters/dataset)"
        )
    found: dict[str, tuple[Task, Path | None]] = {}
    for name in names:
        task = known_task(name)
        folder = _find_dir(root, task or name) if root else None
        if task is None and folder is None:
            raise _unknown(name)
        task = task or Task(name, COMMONSENSE, custom=True)  # kind set by load_records from the answers
        found.setdefault(task.name, (task, folder))
    return list(found.values())


def load_records(task: Task, folder: Path | None, data_dir: str | Path | None) -> tuple[Task, list[dict], Path]:
    """The task's test records (``instruction``, ``input``, ``answer``), the task (its kind inferred if custom) and
    the file they were read from.

    Without a ``test.json`` (``folder`` None), a registry task's hub dataset is converted to the same records and
    cached (``hub_tasks.hub_test_file``); the returned path is then the cached file. A custom task needs its file.
    Every problem is a one-line DataError naming the file (and, for broken records, the record number, 1 for the
    first, and the field).
    """
    if folder is None:
        where = f"{Path(data_dir) / task.name / 'test.json'}" if data_dir else "no --data-dir / eval.data_dir given"
        if task.custom or task.name not in TASKS:
            raise DataError(f"no test file for task {task.name!r} ({where}); to get the files: {GET_FILES}")
        from perft_cli.hub_tasks import hub_test_file  # imports datasets only when a file is missing

        path = hub_test_file(task.name, where)
    else:
        path = folder / "test.json"
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of records with 'instruction' and 'answer'")
    for i, rec in enumerate(records, start=1):  # numbered from 1, as training's data.check_record does
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
        for field in ("instruction", "answer"):
            value = rec.get(field)
            if value is None or not isinstance(value, str | int | float) or isinstance(value, bool):
                raise DataError(f"{path}: record {i}: missing or non-text field {field!r}")
        if not isinstance(rec.get("input") or "", str):
            raise DataError(f"{path}: record {i}: field 'input' must be text")
    answers = [str(r["answer"]).strip() for r in records]
    if task.custom:
        task = infer_task(task.name, answers, str(path))
    elif task.kind == ARITHMETIC and not task.letters:
        for i, a in enumerate(answers, start=1):
            if not _is_number(a):
                raise DataError(f"{path}: record {i}: field 'answer' is not a number ({a!r})")
    rows = [
        {"instruction": str(r["instruction"]), "input": r.get("input") or "", "answer": a}
        for r, a in zip(records, answers, strict=True)
    ]
    return task, rows, path
