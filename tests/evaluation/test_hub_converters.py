"""Test data from the tasks' hub datasets (perft_cli/evaluation/hub_converters.py): the converters against
LLM-Adapters' real test files, record by record; hand-written hub rows; the load path on a local mirror (no network)
with its cache; and the one-line errors offline, from load_records and from ``perft eval``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, write_recipe
from typer.testing import CliRunner

from perft_cli.cli import app
from perft_cli.errors import DataError
from perft_cli.evaluation.hub_converters import NO_SOURCE, SOURCES
from perft_cli.evaluation.tasks import COMMONSENSE, GET_FILES, TASKS, Task, known_task
from perft_cli.evaluation.testsets import load_records
from perft_cli.prompts import eval_prompt

# --- an independent parser: LLM-Adapters record -> the row its hub dataset holds -------------------------------


def _groups(pattern: str, text: str) -> tuple[str, ...]:
    m = re.fullmatch(pattern, text, re.S)
    assert m, f"unexpected instruction: {text[:200]!r}"
    return m.groups()


def _hub_number(answer: str) -> str:
    return answer[:-2] if answer.endswith(".0") else answer  # "72.0" -> "72", as the hub writes it


def _science_choices(block: str, answer: str, i: int) -> tuple[dict, str]:
    texts = re.split(r"(?:^| )Answer\d: ", block)[1:]
    labels = list("ABCDE"[: len(texts)]) if i % 2 == 0 else [str(k) for k in range(1, len(texts) + 1)]  # both kinds
    return {"text": texts, "label": labels}, labels[int(answer.removeprefix("answer")) - 1]


def _boolq(r: dict, i: int) -> dict:
    pattern = r"Please answer the following question with true or false, question: (.*)\?\n\nAnswer format: true/false"
    (q,) = _groups(pattern, r["instruction"])
    return {"question": q, "answer": r["answer"] == "true", "passage": "..."}


def _piqa(r: dict, i: int) -> dict:
    goal, sol1, sol2 = _groups(
        r"Please choose the correct solution to the question: (.*)\n\nSolution1: (.*)\n\nSolution2: (.*)\n\n"
        r"Answer format: solution1/solution2",
        r["instruction"],
    )
    return {"goal": goal, "sol1": sol1, "sol2": sol2, "label": int(r["answer"][-1]) - 1}


def _siqa(r: dict, i: int) -> dict:
    text, a, b, c = _groups(
        r"Please choose the correct answer to the question: (.*)\n\nAnswer1: (.*) Answer2: (.*) Answer3: (.*)\n\n"
        r"Answer format: answer1/answer2/answer3",
        r["instruction"],
    )
    m = re.fullmatch(r"(.*[.!?]) (\S.*)", text, re.S)  # context, then the question as its last sentence
    context, question = m.groups() if m else text.rsplit(" ", 1)
    return dict(context=context, question=question, answerA=a, answerB=b, answerC=c, label=r["answer"][-1])


def _winogrande(r: dict, i: int) -> dict:
    sentence, o1, o2 = _groups(
        r"Please choose the correct answer to fill in the blank to complete the given sentence: (.*)\n\n"
        r"Option1: (.*) Option2: (.*) Answer format: option1/option2",
        r["instruction"],
    )
    return {"sentence": sentence, "option1": o1, "option2": o2, "answer": r["answer"][-1]}


def _science(question_field: str):
    def parse(r: dict, i: int) -> dict:
        q, block = _groups(
            r"Please choose the correct answer to the question: (.*)\n\n(Answer1: .*)\n\nAnswer format: answer1(?:/answer\d)*",  # noqa: E501
            r["instruction"],
        )
        choices, key = _science_choices(block, r["answer"], i)
        return {question_field: q, "choices": choices, "answerKey": key}

    return parse


def _gsm8k(r: dict, i: int) -> dict:
    return {"question": r["instruction"], "answer": f"Some steps <<1+1=2>>.\n#### {_hub_number(r['answer'])}"}


def _aqua(r: dict, i: int) -> dict:
    question, choices = _groups(r"(.*) Answer Choices:( \(A\) .*)", r["instruction"])
    joined = choices.replace(") ", ")").replace(" (", "(")  # undoes ")" -> ") " then "(" -> " ("
    options = re.split(r"\((?=[A-E]\))", joined)[1:]  # "(A)21(B)21.5" -> ["A)21", "B)21.5"]
    return {"question": question, "options": options, "rationale": "...", "correct": r["answer"]}


def _svamp(r: dict, i: int) -> dict:
    body, question = r["instruction"].rsplit(". ", 1)
    body = body + "." if body.endswith(".") else body  # SVAMP bodies with a final "." are joined by one space
    return {"ID": f"chal-{i}", "Body": body, "Question": question, "Answer": float(r["answer"]), "Type": "?"}


def _multiarith(r: dict, i: int) -> dict:
    return {"question": r["instruction"], "final_ans": _hub_number(r["answer"])}


PARSERS = {
    "boolq": _boolq, "piqa": _piqa, "social_i_qa": _siqa, "winogrande": _winogrande, "ARC-Easy": _science("question"),
    "ARC-Challenge": _science("question"), "openbookqa": _science("question_stem"), "gsm8k": _gsm8k, "AQuA": _aqua,
    "SVAMP": _svamp, "MultiArith": _multiarith,
}  # fmt: skip


@pytest.mark.parametrize("name", [*PARSERS, "hellaswag", "AddSub", "SingleEq"])
def test_converter_reproduces_the_llm_adapters_file(name):
    path = SHARED_DATA / name / "test.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing (LLM-Adapters dataset/{name}/test.json)")
    if name not in SOURCES:
        pytest.skip(f"{name}: {NO_SOURCE[name]}")
    records = json.loads(path.read_text(encoding="utf-8"))
    assert len(records) == TASKS[name].expected
    convert, commonsense = SOURCES[name].convert, TASKS[name].kind == COMMONSENSE
    fields = ("instruction", "input", "answer") + (("output",) if commonsense else ())
    bad = []
    for i, rec in enumerate(records):
        got = convert(PARSERS[name](rec, i))
        if {k: got[k] for k in fields} != {k: rec[k] for k in fields}:
            bad.append((i, got, rec))
    assert not bad, f"{len(bad)} of {len(records)} records differ; first: {bad[0]}"


def test_every_task_has_a_source_or_says_why_not():
    assert set(SOURCES) | set(NO_SOURCE) == set(TASKS) and not set(SOURCES) & set(NO_SOURCE)


# --- hand-written hub rows (the datasets' card examples, in their schema) ------------------------------------------

Q = "Please choose the correct answer to the question: "
ARC_ROW = {
    "id": "Mercury_SC_405487",
    "question": "One year, the oak trees in a park began producing more acorns than usual. The next year, the "
    "population of chipmunks in the park also increased. Which best explains why there were more chipmunks the next "
    "year?",
    "choices": {
        "text": [
            "Shady areas increased.",
            "Food sources increased.",
            "Oxygen levels increased.",
            "Available water increased.",
        ],
        "label": ["A", "B", "C", "D"],
    },
    "answerKey": "B",
}
CTX = "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles."
ENDINGS = [
    ", the man adds wax to the windshield and cuts it.",
    ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow as the "
    "we girls sled.",
    ", the man puts on a christmas coat, knitted with netting.",
    ", the man continues removing the snow on his car.",
]
HELLASWAG_ROW = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": CTX, "ctx_b": "then",
                 "ctx": CTX + " then", "endings": ENDINGS, "split": "train", "label": "3"}  # fmt: skip
BOOLQ_ROW = {"question": "do iran and afghanistan speak the same language", "answer": True, "passage": "Persian..."}
PIQA_ROW = {"goal": "When boiling butter, when it's ready, you can", "sol1": "Pour it onto a plate",
            "sol2": "Pour it into a jar", "label": 1}  # fmt: skip
SIQA_ROW = {"context": "Cameron decided to have a barbecue and gathered her friends together.",
            "question": "How would Others feel as a result?", "answerA": "like attending",
            "answerB": "like staying home", "answerC": "a good friend to have", "label": "1"}  # fmt: skip
WINO_ROW = {"sentence": "John moved the couch from the garage to the backyard to create space. The _ is small.",
            "option1": "garage", "option2": "backyard", "answer": "1"}  # fmt: skip
EASY_ROW = {"question": "Which is a source of light?", "answerKey": "2",
            "choices": {"text": ["the Moon", "the Sun", "a mirror"], "label": ["1", "2", "3"]}}  # fmt: skip
OBQA_ROW = {
    "id": "7-980",
    "question_stem": "The sun is responsible for",
    "choices": {
        "text": ["puppies learning new tricks", "children growing up and getting old", "flowers wilting in a vase",
                 "plants sprouting, blooming and wilting"],
        "label": ["A", "B", "C", "D"],
    },
    "answerKey": "D",
}  # fmt: skip
NATALIA = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips "
    "did Natalia sell altogether in April and May?"
)
GSM8K_ROW = {
    "question": NATALIA,
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
    "in April and May.\n#### 72",
}
ICE = (
    "A grocery sells a bag of ice for $1.25, and makes 20% profit. If it sells 500 bags of ice, how much total profit "
    "does it make?"
)
AQUA_ROW = {"question": ICE, "options": ["A)125", "B)150", "C)225", "D)250", "E)275"], "correct": "A",
            "rationale": "Profit per bag = 1.25 * 0.20 = 0.25\nTotal profit = 500 * 0.25 = 125"}  # fmt: skip
GIFT = (
    "M men agree to purchase a gift for Rs. D. If 3 men drop out how much more will each have to contribute towards "
    "the purchase of the gift?"
)
AQUA_PARENS = {"question": GIFT, "options": ["A)D/(M-3)", "B)MD/3", "C)M/(D-3)", "D)3D/(M2-3M)", "E)None of these"],
               "rationale": "...", "correct": "D"}  # fmt: skip
DVDS = "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack"
SVAMP_ROWS = [
    {"ID": "chal-1", "Body": DVDS, "Question": "How much do you have to pay to buy each pack?",
     "Equation": "( 76.0 - 25.0 )", "Answer": 51.0, "Type": "Subtraction"},
    {"ID": "chal-3", "Body": "Paco had 26 salty cookies and 17 sweet cookies. He ate 14 sweet cookies and 9 salty "
     "cookies.", "Question": "How many salty cookies did Paco have left?", "Equation": "( 26.0 - 9.0 )",
     "Answer": 17.0, "Type": "Subtraction"},
]  # fmt: skip
SAM = (
    " At the schools book fair Sam bought 13 adventure books and 17 mystery books. If 15 of the books were used, how "
    "many new books did he buy? "
)
HAND = [  # (task, hub row, the instruction and answer it must give), all written out
    ("boolq", BOOLQ_ROW,
     "Please answer the following question with true or false, question: do iran and afghanistan speak the same "
     "language?\n\nAnswer format: true/false", "true"),
    ("piqa", PIQA_ROW,
     "Please choose the correct solution to the question: When boiling butter, when it's ready, you can\n\n"
     "Solution1: Pour it onto a plate\n\nSolution2: Pour it into a jar\n\nAnswer format: solution1/solution2",
     "solution2"),
    ("social_i_qa", SIQA_ROW,
     Q + "Cameron decided to have a barbecue and gathered her friends together. How would Others feel as a result?"
     "\n\nAnswer1: like attending Answer2: like staying home Answer3: a good friend to have\n\n"
     "Answer format: answer1/answer2/answer3", "answer1"),
    ("hellaswag", HELLASWAG_ROW,
     "Please choose the correct ending to complete the given sentence: Removing ice from car: " + CTX + " then\n\n"
     "Ending1: " + ENDINGS[0] + " Ending2: " + ENDINGS[1] + " Ending3: " + ENDINGS[2] + " Ending4: " + ENDINGS[3]
     + "\n\nAnswer format: ending1/ending2/ending3/ending4", "ending4"),
    ("winogrande", WINO_ROW,
     "Please choose the correct answer to fill in the blank to complete the given sentence: John moved the couch "
     "from the garage to the backyard to create space. The _ is small.\n\nOption1: garage Option2: backyard "
     "Answer format: option1/option2", "option1"),
    ("ARC-Challenge", ARC_ROW,
     Q + ARC_ROW["question"] + "\n\nAnswer1: Shady areas increased. Answer2: Food sources increased. Answer3: Oxygen "
     "levels increased. Answer4: Available water increased.\n\nAnswer format: answer1/answer2/answer3/answer4",
     "answer2"),
    ("ARC-Easy", EASY_ROW,
     Q + "Which is a source of light?\n\nAnswer1: the Moon Answer2: the Sun Answer3: a mirror\n\n"
     "Answer format: answer1/answer2/answer3", "answer2"),
    ("openbookqa", OBQA_ROW,
     Q + "The sun is responsible for\n\nAnswer1: puppies learning new tricks Answer2: children growing up and getting "
     "old Answer3: flowers wilting in a vase Answer4: plants sprouting, blooming and wilting\n\n"
     "Answer format: answer1/answer2/answer3/answer4", "answer4"),
    ("gsm8k", GSM8K_ROW, NATALIA, "72.0"),
    ("gsm8k", {"question": "How many?", "answer": "It is 1,000 + 234.\n#### 1,234"}, "How many?", "1234.0"),
    ("AQuA", AQUA_ROW, ICE + " Answer Choices: (A) 125 (B) 150 (C) 225 (D) 250 (E) 275", "A"),
    ("AQuA", AQUA_PARENS,
     GIFT + " Answer Choices: (A) D/ (M-3)  (B) MD/3 (C) M/ (D-3)  (D) 3D/ (M2-3M)  (E) None of these", "D"),
    ("SVAMP", SVAMP_ROWS[0], DVDS + ". How much do you have to pay to buy each pack?", "51.0"),
    ("SVAMP", SVAMP_ROWS[1],
     "Paco had 26 salty cookies and 17 sweet cookies. He ate 14 sweet cookies and 9 salty cookies. How many salty "
     "cookies did Paco have left?", "17.0"),
    ("MultiArith", {"question": SAM, "final_ans": "15"}, SAM, "15.0"),
]  # fmt: skip


@pytest.mark.parametrize("name,row,instruction,answer", HAND, ids=[f"{h[0]}-{i}" for i, h in enumerate(HAND)])
def test_hand_written_hub_rows(name, row, instruction, answer):
    output = f"the correct answer is {answer}" if TASKS[name].kind == COMMONSENSE else ""
    assert SOURCES[name].convert(row) == {"instruction": instruction, "input": "", "output": output, "answer": answer}


@pytest.mark.parametrize(
    "name,row",
    [("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": -1}),  # hub test splits have no gold label
     ("winogrande", {"sentence": "s _", "option1": "a", "option2": "b", "answer": ""}),
     ("ARC-Easy", {"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}),
     ("gsm8k", {"question": "q", "answer": "no final number"})],
)  # fmt: skip
def test_rows_without_gold_are_refused(name, row):
    with pytest.raises(ValueError):
        SOURCES[name].convert(row)


# --- the load path on a local mirror: PERFT_HUB_TASKS_DIR, no network ----------------------------------------------


def _parquet(path: Path, rows: list[dict]) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A mirror with four datasets in the layouts ``hf download`` writes, and a fresh perft and datasets cache."""
    import datasets

    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    monkeypatch.setenv("PERFT_HUB_TASKS_DIR", str(mirror))
    monkeypatch.setenv("PERFT_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")  # keep ~/.cache clean
    boolq = [BOOLQ_ROW, {"question": "is the sky green", "answer": False, "passage": "..."}]
    (mirror / "google/boolq").mkdir(parents=True)
    (mirror / "google/boolq/validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in boolq))
    _parquet(mirror / "allenai/ai2_arc/ARC-Challenge/test-00000-of-00001.parquet", [ARC_ROW])
    _parquet(mirror / "allenai/ai2_arc/ARC-Easy/test-00000-of-00001.parquet", [{**EASY_ROW, "id": "e-1"}])
    configs = "".join(
        f"- config_name: {c}\n  data_files:\n  - split: test\n    path: {c}/test-*\n"
        for c in ("ARC-Challenge", "ARC-Easy")
    )
    (mirror / "allenai/ai2_arc/README.md").write_text(f"---\nconfigs:\n{configs}---\n")  # the card's config list
    _parquet(mirror / "ChilleD/SVAMP/data/train-00000-of-00001.parquet", [SVAMP_ROWS[1]])
    _parquet(mirror / "ChilleD/SVAMP/data/test-00000-of-00001.parquet", [SVAMP_ROWS[0]])
    _parquet(mirror / "ybisk/piqa/default/validation/0000.parquet", [PIQA_ROW])  # the refs/convert/parquet layout
    return mirror, cache / "tasks"


GREEN = (
    "Please answer the following question with true or false, question: is the sky green?\n\nAnswer format: true/false"
)


def _expected(name: str) -> list[dict]:
    return [{"instruction": h[2], "input": "", "answer": h[3]} for h in HAND if h[0] == name]


def test_hub_dataset_converted_cached_and_reused(hub):
    mirror, cache = hub
    expected = {
        "boolq": [*_expected("boolq"), {"instruction": GREEN, "input": "", "answer": "false"}],
        "ARC-Challenge": _expected("ARC-Challenge"),  # the config's rows only
        "SVAMP": _expected("SVAMP")[::-1],  # train, then test
        "piqa": _expected("piqa"),
    }  # fmt: skip
    for name, rows in expected.items():
        task, records, path = load_records(known_task(name), None, None)
        assert (task.name, records, path) == (name, rows, cache / name / "test.json")
        on_disk = json.loads(path.read_text(encoding="utf-8"))
        assert [{k: r[k] for k in ("instruction", "input", "answer")} for r in on_disk] == rows
        assert set(on_disk[0]) == {"instruction", "input", "output", "answer"}
        source = json.loads((cache / name / "source.json").read_text())
        assert source["repo"] == SOURCES[name].repo and source["rows"] == len(rows)
        assert source["mirror"] == str(mirror / SOURCES[name].repo) and source["format"] == 1
    assert not list(cache.rglob("*.tmp"))  # written atomically: no temporary file left
    shutil.rmtree(mirror)  # the second run reads the cache: no mirror, no hub
    for name, rows in expected.items():
        assert load_records(known_task(name), None, "/nowhere")[1:] == (rows, cache / name / "test.json")


def test_broken_hub_rows_are_one_line(hub):
    mirror, _ = hub
    (mirror / "google/boolq/validation.jsonl").write_text(json.dumps({"query": "q", "answer": True}) + "\n")
    with pytest.raises(DataError) as e:
        load_records(known_task("boolq"), None, None)
    msg = str(e.value)
    assert "google/boolq row 0: cannot convert it" in msg and "KeyError: 'question'" in msg and "\n" not in msg


def test_missing_mirror_copy_and_tasks_without_source(hub, tmp_path):
    with pytest.raises(DataError) as e:
        load_records(known_task("gsm8k"), None, tmp_path)
    msg = str(e.value)
    assert f"no test file for task 'gsm8k' ({tmp_path / 'gsm8k' / 'test.json'})" in msg
    assert "openai/gsm8k could not be loaded (no copy of it at" in msg and GET_FILES in msg and "\n" not in msg
    for name in ("AddSub", "SingleEq"):
        with pytest.raises(DataError, match=rf"task '{name}' .*has no hub dataset to convert; to get the files: git"):
            load_records(known_task(name), None, tmp_path)
    custom = Task("my_task", COMMONSENSE, custom=True)  # custom tasks still need their file
    with pytest.raises(DataError, match=r"^no test file for task 'my_task' \(.*\); to get the files: git clone"):
        load_records(custom, None, tmp_path)


# --- offline: one line that says what failed and what to do -------------------------------------------------------


def test_offline_without_mirror_is_one_line(tmp_path):
    """A fresh process with only the environment variables a user sets: no network, no traceback, one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PERFT_", "HF_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PERFT_CACHE=str(tmp_path))
    code = (
        "import sys\nfrom perft_cli.errors import DataError\nfrom perft_cli.evaluation.tasks import known_task\n"
        "from perft_cli.evaluation.testsets import load_records\n"
        "try:\n    load_records(known_task('piqa'), None, None)\n"
        "except DataError as e:\n    print(e)\n    sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("no test file for task 'piqa' (no --data-dir")
    assert "ybisk/piqa could not be loaded" in r.stdout and "Offline" in r.stdout and GET_FILES in r.stdout


@pytest.fixture
def offline(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.delenv("PERFT_HUB_TASKS_DIR", raising=False)
    monkeypatch.setenv("PERFT_CACHE", str(tmp_path / "cache"))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # The libraries read these variables once, at import, which happened earlier in this process.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def test_load_records_offline(offline, tmp_path):
    with pytest.raises(DataError) as e:
        load_records(known_task("boolq"), None, tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"no test file for task 'boolq' ({tmp_path / 'boolq' / 'test.json'}) and its hub dataset")
    assert "google/boolq could not be loaded" in msg and "Offline" in msg and "\n" not in msg
    assert msg.endswith(f"to get the files: {GET_FILES}") and "--data-dir LLM-Adapters/dataset" in msg


def _recipe(tmp_path: Path, model_dir: Path, **eval_) -> Path:
    raw = {"model": {"name_or_path": str(model_dir), "dtype": "float32"}, "output_dir": str(tmp_path / "run")}
    return write_recipe(tmp_path, raw, eval={"max_new_tokens": 4, "batch_size": 2, **eval_})


def test_perft_eval_offline_is_one_line(offline, tmp_path, tiny_model_dir):
    r = CliRunner().invoke(
        app, ["eval", "--base", "--recipe", str(_recipe(tmp_path, tiny_model_dir())), "--tasks", "boolq"]
    )
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "no test file for task 'boolq'" in r.stderr and "google/boolq could not be loaded" in r.stderr
    assert "git clone https://github.com/AGI-Edgerunners/LLM-Adapters" in r.stderr


def test_perft_eval_on_a_hub_task(hub, tmp_path, tiny_model_dir):
    """``perft eval --tasks boolq`` with no test file: the mirror's rows, converted, are what the model is asked."""
    _, cache = hub
    out = tmp_path / "res.json"
    recipe = _recipe(tmp_path, tiny_model_dir())
    r = CliRunner().invoke(app, ["eval", "--base", "--recipe", str(recipe), "--tasks", "boolq", "--json", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["tasks"]["boolq"]["data_file"] == str(cache / "boolq" / "test.json")
    rows = [json.loads(line) for line in Path(result["examples_file"]).read_text().splitlines()]
    asked = [x["instruction"] for x in _expected("boolq")] + [GREEN]
    assert [r["prompt"] for r in rows] == [eval_prompt(x, "", commonsense=True) for x in asked]
    assert [r["gold"] for r in rows] == ["true", "false"]
