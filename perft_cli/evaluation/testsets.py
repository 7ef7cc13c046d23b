"""A task's test records: finding ``<data-dir>/<task>/test.json``, custom tasks' kind from their answers, checking
every record; a registry task without a file is converted from its hub dataset (``hub_converters``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from perft_cli.errors import DataError
from perft_cli.evaluation.tasks import (
    ARITHMETIC,
    COMMONSENSE,
    GET_FILES,
    TASKS,
    Task,
    known_task,
    normalize_name,
    unknown_task,
)

_LABEL_FAMILY = re.compile(r"^(option|answer|solution|ending)(\d+)$")


def _find_dir(data_dir: Path, task: Task | str) -> Path | None:
    """``<data_dir>/<name>``, or a folder whose name differs only in case / ``-`` / ``_`` (e.g. ``arc-easy``)."""
    name = task.name if isinstance(task, Task) else task
    if (data_dir / name / "test.json").is_file():
        return data_dir / name
    if data_dir.is_dir():
        for d in sorted(data_dir.iterdir()):
            if (d / "test.json").is_file() and (
                normalize_name(d.name) == normalize_name(name) or known_task(d.name) is task
            ):
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
            raise unknown_task(name)
        task = task or Task(name, COMMONSENSE, custom=True)  # kind set by load_records from the answers
        found.setdefault(task.name, (task, folder))
    return list(found.values())


def load_records(task: Task, folder: Path | None, data_dir: str | Path | None) -> tuple[Task, list[dict], Path]:
    """The task's test records (``instruction``, ``input``, ``answer``), the task (its kind inferred if custom) and
    the file they were read from.

    Without a ``test.json`` (``folder`` None), a registry task's hub dataset is converted to the same records and
    cached (``hub_converters.hub_test_file``); the returned path is then the cached file. A custom task needs its file.
    Every problem is a one-line DataError naming the file (and, for broken records, the record number, 1 for the
    first, and the field).
    """
    if folder is None:
        where = f"{Path(data_dir) / task.name / 'test.json'}" if data_dir else "no --data-dir / eval.data_dir given"
        if task.custom or task.name not in TASKS:
            raise DataError(f"no test file for task {task.name!r} ({where}); to get the files: {GET_FILES}")
        from perft_cli.evaluation.hub_converters import hub_test_file  # imports datasets only when a file is missing

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
