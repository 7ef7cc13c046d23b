"""The evaluation tasks of method.md: names, aliases, label sets and answer extraction (test files: ``testsets``).

Pure Python (no torch): the scoring rules here are the paper's protocol (LLM-Adapters ``commonsense_evaluate.py``
and ``evaluate.py``) and are pinned by tests, so that our accuracies are comparable with published ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from perft_cli.errors import PerftError
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


def normalize_name(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


_BY_ALIAS = {normalize_name(a): t for t in TASKS.values() for a in (t.name, *t.aliases)}


def known_task(name: str) -> Task | None:
    """The registry task for a name or alias (case-insensitive, ``-``/``_`` ignored), else None."""
    return _BY_ALIAS.get(normalize_name(name))


def unknown_task(name: str) -> PerftError:
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
        raise unknown_task(str(task))
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
