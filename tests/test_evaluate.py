"""The evaluation protocol (method.md): prompt bytes, answer extraction, task registry, test files, batching."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from perft_cli.errors import DataError, PerftError
from perft_cli.evaluate import extract_answer
from perft_cli.evaluation.tasks import TASKS, is_correct, known_task
from perft_cli.evaluation.testsets import load_records, resolve_tasks
from perft_cli.prompts import eval_prompt

SHARED = Path(__file__).resolve().parents[2] / "shared/data/llm-adapters"


# --- prompt bytes (written out from method.md "Prompt templates", 16-space indents) ---------------------------


def test_eval_prompt_commonsense_bytes():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
        "\n"
        "                ### Instruction:\n"
        "                Is the sky blue?\n"
        "\n"
        "                ### Response:\n"
        "                the correct answer is"
    )
    assert eval_prompt("Is the sky blue?", "", commonsense=True) == expected


def test_eval_prompt_arithmetic_bytes():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n"
        "\n"
        "                ### Instruction:\n"
        "                What is 2 + 3?\n"
        "\n"
        "                ### Response:\n"
        "                "
    )
    assert eval_prompt("What is 2 + 3?", "", commonsense=False) == expected


def test_eval_prompt_with_input_bytes():
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n"
        "\n"
        "                ### Instruction:\n"
        "                Add.\n"
        "\n"
        "                ### Input:\n"
        "                2 3\n"
        "\n"
        "                ### Response:\n"
        "                the correct answer is"
    )
    assert eval_prompt("Add.", "2 3", commonsense=True) == expected


# --- answer extraction ------------------------------------------------------------------------------------------

CASES = [
    # BoolQ: first match, case-sensitive
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false, or maybe true", "false"),
    ("boolq", "True or False", None),
    ("boolq", "untrue", "true"),  # a substring match, as in the reference regex
    ("piqa", "solution2 rather than solution1", "solution2"),
    ("piqa", "solution3", None),
    ("social_i_qa", "answer3 answer1", "answer3"),
    ("social_i_qa", "Answer2", None),
    ("ARC-Easy", "the correct answer is answer4", "answer4"),
    ("ARC-Challenge", "answer5.", "answer5"),
    ("ARC-Challenge", "answer6", None),
    ("openbookqa", "I think answer2 and answer1", "answer2"),
    ("hellaswag", "ending4 then ending1", "ending4"),
    ("hellaswag", "ending5", None),
    ("winogrande", "option2 option1", "option2"),
    ("winogrande", "the correct answer is", None),
    # aliases resolve to the same rules
    ("siqa", "answer1", "answer1"),
    ("arc-e", "answer2", "answer2"),
    ("arc_c", "answer3", "answer3"),
    ("obqa", "answer4", "answer4"),
    # arithmetic: commas removed, LAST number, float
    ("gsm8k", "The answer is 42.", 42.0),
    ("gsm8k", "-1,234.5", -1234.5),
    ("gsm8k", "3 apples and 4 pears make 7", 7.0),
    ("gsm8k", "no number here", None),
    ("SVAMP", "The result is -7 degrees", -7.0),
    ("svamp", "1,000,000 dollars", 1000000.0),
    ("AddSub", "2.50 + 1.25 = 3.75", 3.75),
    ("MultiArith", "x = 5. The answer is 12", 12.0),
    ("SingleEq", "answer: 0.6", 0.6),
    ("SingleEq", "12-3", -3.0),  # the regex reads "-3" (a known quirk of the rule, kept)
    # AQuA: the first capital A-E anywhere (a known weakness, kept for comparability)
    ("AQuA", "A: the answer is C", "A"),
    ("aqua", "The answer is (D).", "D"),  # "T" and "h" are not A-E; the first A-E capital is D
    ("AQuA", "Because ...", "B"),
    ("AQuA", "the answer is e", None),
]


@pytest.mark.parametrize("task,text,expected", CASES)
def test_extract_answer(task, text, expected):
    got = extract_answer(task, text)
    assert got == expected and type(got) is type(expected)


def test_extract_answer_reads_only_the_response():
    """Given the whole decoded output, the prompt's words ("true/false", the question's numbers, "Below ...")
    must not be read as the answer: only the text after the last "### Response:" counts (method.md)."""
    boolq = eval_prompt("Is the sky green?\n\nAnswer format: true/false", "", True)
    assert extract_answer("boolq", boolq + " false") == "false"
    assert extract_answer("gsm8k", eval_prompt("Tom has 3 apples and 5 pears.", "", False) + " He has 8.") == 8.0
    assert extract_answer("aqua", eval_prompt("How many? Answer Choices: A)1 B)2", "", False) + " so C") == "C"
    assert extract_answer("gsm8k", eval_prompt("Tom has 3 apples.", "", False)) is None  # empty response


def test_comparability_reasons(tmp_path):
    from perft_cli.evaluate import _not_comparable
    from perft_cli.evaluation import hub_converters as hub_tasks

    boolq, hellaswag = known_task("boolq"), known_task("hellaswag")
    file = tmp_path / "boolq" / "test.json"
    assert _not_comparable(boolq, True, file, 4, 4) == []
    assert _not_comparable(boolq, False, file, 1, 8) == [
        "not the paper's full test set",
        "1 beams (protocol: 4)",
        "8 new tokens (protocol: 4)",
    ]
    assert _not_comparable(hellaswag, True, tmp_path / "hellaswag" / "test.json", 4, 4) == []  # a real file
    cached = hub_tasks.cache_root() / "hellaswag" / "test.json"  # converted from the hub, never checked
    assert _not_comparable(hellaswag, True, cached, 4, 4) == [
        "converted from the hub without a reference file to check the conversion against"
    ]


def test_extract_answer_unknown_task_lists_known():
    with pytest.raises(PerftError, match="known tasks: boolq, piqa"):
        extract_answer("mmlu", "A")


def test_is_correct_rules():
    gsm = TASKS["gsm8k"]
    assert is_correct(gsm, 42.0, "42.0") and is_correct(gsm, 42.0009, "42") and not is_correct(gsm, 42.002, "42")
    assert not is_correct(gsm, None, "0")
    assert is_correct(TASKS["AQuA"], "C", "C") and not is_correct(TASKS["AQuA"], "A", "C")
    assert is_correct(TASKS["boolq"], "true", "true") and not is_correct(TASKS["boolq"], None, "true")


# --- registry ---------------------------------------------------------------------------------------------------


def test_registry_has_the_14_tasks_of_method_md():
    counts = {
        "boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "hellaswag": 10042, "winogrande": 1267,
        "ARC-Easy": 2376, "ARC-Challenge": 1172, "openbookqa": 500, "gsm8k": 1319, "SVAMP": 1000,
        "AddSub": 395, "MultiArith": 600, "SingleEq": 508, "AQuA": 254,
    }  # fmt: skip
    assert {n: t.expected for n, t in TASKS.items()} == counts
    assert [n for n, t in TASKS.items() if t.kind == "commonsense"] == list(counts)[:8]
    assert {t.max_new_tokens for t in TASKS.values() if t.kind == "commonsense"} == {4}
    assert {t.max_new_tokens for t in TASKS.values() if t.kind == "arithmetic"} == {256}


@pytest.mark.parametrize(
    "alias,name",
    [("SIQA", "social_i_qa"), ("arc-e", "ARC-Easy"), ("arc_c", "ARC-Challenge"), ("OBQA", "openbookqa"),
     ("svamp", "SVAMP"), ("aqua", "AQuA"), ("BoolQ", "boolq"), ("addsub", "AddSub"), ("multi_arith", "MultiArith")],
)  # fmt: skip
def test_aliases(alias, name):
    assert known_task(alias).name == name


def _write(root: Path, name: str, records) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "test.json").write_text(json.dumps(records))
    return root


def _load(root: Path, name: str):
    ((task, folder),) = resolve_tasks([name], root)
    return load_records(task, folder, root)


@pytest.mark.parametrize(
    "answers,kind,labels",
    [
        (["option1", "option2", "option1"], "commonsense", ("option1", "option2")),
        (["answer1", "answer4"], "commonsense", ("answer1", "answer2", "answer3", "answer4")),
        (["true", "false"], "commonsense", ("true", "false")),
        (["solution2"], "commonsense", ("solution1", "solution2")),
        (["ending3", "ending1"], "commonsense", ("ending1", "ending2", "ending3")),
        (["3", "-1.5", "7.0"], "arithmetic", ()),
    ],
)
def test_custom_task_kind_inferred_from_answers(tmp_path, answers, kind, labels):
    root = _write(
        tmp_path, "my_task", [{"instruction": f"q{i}", "input": "", "answer": a} for i, a in enumerate(answers)]
    )
    task, rows, _ = _load(root, "my_task")
    assert (task.kind, task.labels, task.custom, len(rows)) == (kind, labels, True, len(answers))
    assert task.max_new_tokens == (4 if kind == "commonsense" else 256)


def test_custom_task_letters_and_mixed(tmp_path):
    root = _write(tmp_path, "letters", [{"instruction": "q", "answer": "C"}, {"instruction": "q", "answer": "A"}])
    task, _, _ = _load(root, "letters")
    assert task.letters and extract_answer(task, "so C") == "C"
    _write(tmp_path, "mixed", [{"instruction": "q", "answer": "option1"}, {"instruction": "q", "answer": "maybe"}])
    with pytest.raises(DataError, match="cannot tell the kind of custom task 'mixed'.*'maybe'"):
        _load(tmp_path, "mixed")


def test_task_folder_found_case_insensitively(tmp_path):
    _write(tmp_path, "arc-easy", [{"instruction": "q", "input": "", "answer": "answer1"}])
    task, rows, path = _load(tmp_path, "ARC-Easy")
    assert task.name == "ARC-Easy" and path.parent.name == "arc-easy" and rows[0]["answer"] == "answer1"


def test_unknown_task_is_one_line_error(tmp_path):
    with pytest.raises(PerftError) as e:
        resolve_tasks(["nope"], tmp_path)
    assert "unknown task 'nope'" in str(e.value) and "AQuA" in str(e.value) and "\n" not in str(e.value)


def test_missing_file_says_where_and_how(tmp_path):
    ((task, folder),) = resolve_tasks(["boolq"], tmp_path)
    with pytest.raises(DataError) as e:
        load_records(task, folder, tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "boolq" / "test.json") in msg and "git clone https://github.com/AGI-Edgerunners" in msg
    assert "--data-dir LLM-Adapters/dataset" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "records,match",
    [
        # Numbered from 1, as training's data.check_record numbers them: "record 1" is the first record.
        ([{"instruction": "q", "answer": "1"}, {"instruction": "q"}], r"test.json: record 2: .*field 'answer'"),
        ([{"answer": "1"}], r"test.json: record 1: .*field 'instruction'"),
        ([{"instruction": "q", "answer": "1"}, {"instruction": None, "answer": "2"}], r"record 2: .*'instruction'"),
        ([{"instruction": "q", "answer": "1"}, "text"], r"record 2 is a str"),
        ([{"instruction": "q", "answer": "1", "input": 3}], r"record 1: field 'input' must be text"),
        ({"instruction": "q"}, r"expected a non-empty JSON list"),
    ],
)
def test_broken_records(tmp_path, records, match):
    _write(tmp_path, "gsm8k", records)
    with pytest.raises(DataError, match=match):
        _load(tmp_path, "gsm8k")


def test_non_numeric_gold_for_arithmetic(tmp_path):
    _write(tmp_path, "gsm8k", [{"instruction": "q", "answer": "12"}, {"instruction": "q", "answer": "twelve"}])
    with pytest.raises(DataError, match=r"record 2: field 'answer' is not a number \('twelve'\)"):
        _load(tmp_path, "gsm8k")


def test_missing_data_dir_is_named_not_every_task_unknown(tmp_path):
    """A mistyped --data-dir is a missing folder, not an unknown task 'demo_choice' (nor a hub download)."""
    for names in (["demo_choice"], ["boolq"]):
        with pytest.raises(DataError) as e:
            resolve_tasks(names, tmp_path / "nodatadir")
        msg = str(e.value)
        assert f"--data-dir {str(tmp_path / 'nodatadir')!r} does not exist" in msg and "unknown task" not in msg
        assert "<task>/test.json" in msg and "\n" not in msg
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"eval.data_dir '.*afile' is a file, not a folder"):
        resolve_tasks(["boolq"], tmp_path / "afile", "eval.data_dir")


# --- output files: checked before the work, written whole or not at all ------------------------------------------


def test_output_paths_are_checked_in_one_line(tmp_path, monkeypatch):
    import os

    from perft_cli.outputs import check_output_file

    (tmp_path / "adir").mkdir()
    (tmp_path / "afile.txt").write_text("hi")
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and access(p, mode, **kw))
    cases = [
        (tmp_path / "adir", "--json '.*adir' is a folder; it names the file to write: FIX"),
        (tmp_path / "afile.txt" / "res.json", r"cannot be created: '.*afile.txt' is a file, not a folder; FIX"),
        (tmp_path / "afile.txt" / "deeper" / "res.json", r"'.*afile.txt' is a file, not a folder"),
        (locked / "new" / "res.json", r"cannot be written: no permission to write in '.*locked'; FIX"),
    ]
    for path, match in cases:
        with pytest.raises(PerftError, match=match) as e:
            check_output_file(path, "--json", "FIX")
        assert "\n" not in str(e.value)
    check_output_file(tmp_path / "new" / "folders" / "res.json", "--json", "FIX")  # folders are made when writing
    check_output_file(tmp_path / "afile.txt", "--json", "FIX")  # an existing file is replaced


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder no one can create files in")
def test_an_output_under_proc_is_refused_before_the_work(tmp_path):
    """root passes os.access on /proc: the results were lost after the whole evaluation (FileNotFoundError)."""
    from perft_cli.outputs import check_output_file

    with pytest.raises(PerftError, match=r"--json '/proc/perft-results.json' cannot be written in '/proc': .*; FIX"):
        check_output_file(Path("/proc/perft-results.json"), "--json", "FIX")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_file_leaves_nothing_on_failure(tmp_path, error):
    from perft_cli.outputs import atomic_file

    (tmp_path / "old.json").write_text("before")
    for target in (tmp_path / "new" / "deeper" / "res.json", tmp_path / "old.json"):
        with pytest.raises(error), atomic_file(target) as tmp:
            tmp.write_text("half")
            raise error()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # no temporary file, no new folders
    assert (tmp_path / "old.json").read_text() == "before"
    with atomic_file(tmp_path / "new" / "res.json") as tmp:
        tmp.write_text("whole")
    assert (tmp_path / "new" / "res.json").read_text() == "whole" and len(list((tmp_path / "new").iterdir())) == 1


def test_invalid_json(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "test.json").write_text('[{"instruction": "q",]')
    with pytest.raises(DataError, match=r"piqa/test.json: not valid JSON at line 1"):
        _load(tmp_path, "piqa")


# --- the real LLM-Adapters test files: the label sets parse the reference rationales --------------------------

# Lower bounds on the share of records whose reference `output` parses to the gold answer. The commonsense outputs
# are "the correct answer is <label>"; the arithmetic ones are model-written rationales that are sometimes wrong
# (the shared README says so); AQuA's first-capital rule is a known weakness (measured ~43%).
MIN_SHARE = {"gsm8k": 0.5, "SVAMP": 0.75, "AddSub": 0.9, "MultiArith": 0.9, "SingleEq": 0.9, "AQuA": 0.35}


@pytest.mark.parametrize("name", [n for n in TASKS if n != "hellaswag"])
def test_real_files_reference_outputs_parse(name):
    if not (SHARED / name / "test.json").is_file():
        pytest.skip(f"shared LLM-Adapters data not found at {SHARED / name}")
    task, rows, path = _load(SHARED, name)
    raw = json.loads(path.read_text())
    assert len(rows) == task.expected
    share = sum(
        is_correct(task, extract_answer(task, r["output"]), row["answer"]) for r, row in zip(raw, rows, strict=True)
    )
    share /= len(rows)
    assert share >= MIN_SHARE.get(name, 0.999), f"{name}: {share:.4f}"
    if task.kind == "commonsense":
        assert {row["answer"] for row in rows} <= set(task.labels)


# --- batched generation == one at a time ------------------------------------------------------------------------


@contextlib.contextmanager
def one_thread():
    """Generation runs many tiny kernels: two threads on a busy 2-core machine mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_batched_generation_matches_one_at_a_time(tiny_model_dir, tmp_path):
    from conftest import make_checkpoint
    from transformers.utils import logging as hf_logging

    from perft_cli.evaluation.generation import generate_responses
    from perft_cli.modeling import load_trained

    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_model_dir("olmoe"))
    model, tok, *_ = load_trained(ckpt)  # fp32, PERFT-R adapters attached
    hf_logging.warning_once.cache_clear()  # each warning_once line is printed once a process: let it print here
    logged = _Collect()
    hf_logging.get_logger("transformers").addHandler(logged)
    questions = ["2+2?", "Is ice cold?", "A much longer question about " + "apples and pears " * 6, "x", "Why?"]
    prompts = [eval_prompt(q, "", commonsense=i % 2 == 0) for i, q in enumerate(questions)]
    kwargs = dict(num_beams=4, max_new_tokens=6)
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecations (past_key_values) are errors here
        batched = generate_responses(model, tok, prompts, batch_size=3, **kwargs)
        single = [generate_responses(model, tok, [p], batch_size=1, **kwargs)[0] for p in prompts]
        plain = generate_responses(model, tok, prompts, batch_size=3, shared_prefill=False, **kwargs)
    hf_logging.get_logger("transformers").removeHandler(logged)
    assert not [m for m in logged.messages if "deprecated" in m]  # e.g. reading an output's past_key_values
    assert batched == single
    assert plain == batched  # the shared prompt prefill (once per example, not per beam) changes no answer
    assert all(r.startswith("the correct answer is") for r in batched[::2])  # the response keeps the pre-fill


def test_only_the_papers_whole_groups_on_a_bf16_backbone_are_comparable():
    """A one- or seven-task average, an average of a kind with no task, a 4-bit or fp32 backbone: not the paper's."""
    from perft_cli.evaluate import _average_differs, _backbone_differs
    from perft_cli.evaluation.tasks import ARITHMETIC_TASKS, COMMONSENSE_TASKS

    assert _backbone_differs("none", "bfloat16") == []
    assert _backbone_differs("nf4", "bfloat16") == ["nf4 (4-bit) backbone (the paper evaluated on bf16)"]
    assert _backbone_differs("none", "float32") == ["float32 backbone (the paper evaluated on bfloat16)"]
    ok = {"kind": "commonsense", "comparable": True}
    one = {"boolq": ok}
    assert _average_differs(one, "commonsense")[0].startswith("1 of the paper's 8 commonsense tasks (missing: piqa,")
    seven = {name: ok for name in COMMONSENSE_TASKS[:7]}
    assert _average_differs(seven, "commonsense") == ["7 of the paper's 8 commonsense tasks (missing: openbookqa)"]
    assert _average_differs(seven, "arithmetic") == ["no arithmetic task was evaluated"]
    every = {name: ok for name in COMMONSENSE_TASKS}
    assert _average_differs(every, "commonsense") == []
    assert _average_differs({"my_task": ok}, "commonsense") == ["none of the paper's 8 commonsense tasks"]
    every["piqa"] = {"kind": "commonsense", "comparable": False}
    assert _average_differs(every, "commonsense") == ["a task in it is not comparable"]
    math = {name: {"kind": "arithmetic", "comparable": True} for name in ARITHMETIC_TASKS}
    assert _average_differs(math, "arithmetic") == []
