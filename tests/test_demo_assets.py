"""The shipped demo assets (demo/data, demo/tiny-moe) match their committed generators and work."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "demo" / "data"
MODEL = ROOT / "demo" / "tiny-moe"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


dd = _load("demo_data")


def _records(rel: str) -> list[dict[str, str]]:
    return json.loads((DATA / rel).read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------ data
def test_generator_rebuilds_shipped_files_byte_for_byte():
    files = dd.render_files(dd.SEED)
    assert set(files) == {"train.json", "demo_choice/test.json", "demo_math/test.json", "pretrain.txt"}
    for rel, text in files.items():
        assert (DATA / rel).read_bytes() == text.encode("utf-8"), rel


def test_rebuilt_batches_equal_shipped_records():
    splits = dd.build_splits(dd.SEED)
    shipped = {"train": _records("train.json"), "demo_choice": _records("demo_choice/test.json")}
    shipped["demo_math"] = _records("demo_math/test.json")
    for name, records in shipped.items():
        for start in (0, len(records) // 2, len(records) - 8):  # a few batches of 8
            assert splits[name][start : start + 8] == records[start : start + 8], (name, start)


def test_task_format_sizes_and_splits():
    train, choice, math = _records("train.json"), _records("demo_choice/test.json"), _records("demo_math/test.json")
    assert 1000 <= len(train) <= 2000 and len(choice) == len(math) == 100
    for r in train + choice + math:
        assert set(r) == {"instruction", "input", "output", "answer"} and r["input"] == ""
    for r in choice + [r for r in train if r["answer"].startswith("option")]:
        assert r["instruction"].endswith("Answer format: option1/option2")
        assert r["output"] == f"the correct answer is {r['answer']}"
    for r in math + [r for r in train if not r["answer"].startswith("option")]:
        assert r["output"].endswith(f"The answer is {r['answer']}.") and 0 <= int(r["answer"]) < 20
    train_choice = [r for r in train if r["answer"].startswith("option")]
    for records in (choice, train_choice):  # balanced gold labels
        assert sum(r["answer"] == "option1" for r in records) == len(records) // 2
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in choice + math}
    # Choice test questions ask about (entity, attribute) pairs that no training question asks about.
    index = _question_index()
    asked = {_parse_choice(r["instruction"], index)[:2] for r in train_choice}
    assert not asked & {_parse_choice(r["instruction"], index)[:2] for r in choice}


def _question_index() -> dict[str, tuple[str, str, str]]:
    """Every yes/no question the world allows -> (entity, attribute, value asked about)."""
    index = {}
    for attribute, (kind, values) in dd.ATTRIBUTES.items():
        for entity in dd.OBJECTS if kind == "object" else dd.PEOPLE:
            for v in values:
                for template in dd._YES_NO[attribute]:
                    index[template.format(e=entity, v=v)] = (entity, attribute, v)
    return index


def _parse_choice(instruction: str, index: dict[str, tuple[str, str, str]]) -> tuple[str, str, str]:
    question, tail = instruction.split("? ", 1)
    assert tail == "Option1: yes Option2: no Answer format: option1/option2"
    return index[question + "?"]


def test_choice_answers_are_facts_stated_in_the_corpus():
    corpus = set(dd.pretrain_corpus(dd.SEED))
    world = dd.build_world(dd.SEED)
    index = _question_index()
    for r in _records("demo_choice/test.json"):
        entity, attribute, asked = _parse_choice(r["instruction"], index)
        truth = world.facts[(entity, attribute)]
        assert r["answer"] == ("option1" if asked == truth else "option2")
        stated = dd._phrasings(world, entity, attribute, random.Random(0))[0]  # "The ball is red." etc.
        assert stated in corpus


def test_pretraining_text_never_shows_the_tasks():
    """No task answer ("the correct answer is optionN", "The answer is N."), no Option1/Option2 listing and no
    option labels anywhere in pretraining. (The generic shell examples may say "Answer format: yes/no" or
    "first/second": a format line is not the task; the task's own line "option1/option2" is banned.)"""
    corpus = "\n".join(dd.pretrain_corpus(dd.SEED))
    shell = "\n".join(f"{i}\n{o}" for i, o in dd.instruction_examples(dd.SEED))
    for text in (corpus, shell):
        for banned in ("answer is", "Option1", "Option2", "option1", "option2", "Option 1", "option 1"):
            assert banned not in text, banned
    for r in _records("demo_math/test.json") + _records("demo_choice/test.json"):
        assert r["instruction"] not in corpus and r["output"] not in corpus


# ------------------------------------------------------------------------------------------------ model
@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (MODEL / "model.safetensors").is_file():
        pytest.skip("demo/tiny-moe is missing; make it with: python scripts/pretrain_tiny_moe.py --out demo/tiny-moe")
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    return model, tokenizer


def test_model_is_small_olmoe(tiny):
    model, tokenizer = tiny
    assert model.config.model_type == "olmoe" and model.config.norm_topk_prob is False
    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 10 * 2**20
    assert {tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token} == {
        "<pad>", "<s>", "</s>", "<unk>"
    }  # fmt: skip
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.config.vocab_size == len(tokenizer)


def test_model_generates_facts_it_was_pretrained_on(tiny):
    model, tokenizer = tiny
    world = dd.build_world(dd.SEED)
    objects = [o for o in dd.OBJECTS[:6]]
    hits = 0
    for o in objects:
        ids = tokenizer(f"The colour of the {o} is", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert text.strip()  # it generates something
        hits += text.startswith(f" {world.facts[(o, 'colour')]}")
    assert hits >= len(objects) - 1


def test_prompt_templates_round_trip_through_the_tokenizer(tiny):
    _, tokenizer = tiny
    i16 = " " * 16
    # The exact LLM-Adapters bytes (docs/method.md).
    assert dd.train_prompt("X", "Y") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"  \n\n{i16}### Instruction:\n{i16}X\n{i16}\n{i16}### Response:\n{i16}Y"
    )
    assert dd.eval_prompt("X", commonsense=True).endswith(f"request. \n\n{i16}### Instruction:\n{i16}X\n\n{i16}"
                                                          f"### Response:\n{i16}the correct answer is")  # fmt: skip
    records = _records("demo_choice/test.json")[:3] + _records("demo_math/test.json")[:3]
    for r in records:
        for text in (
            dd.train_prompt(r["instruction"], r["output"]),
            dd.eval_prompt(r["instruction"], commonsense=r["answer"].startswith("option")),
        ):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text


def test_eval_prompt_tokens_are_a_prefix_of_prompt_plus_answer(tiny):
    """The evaluation prompt ends in 16 spaces (or "the correct answer is"); its tokens must be the ones a model
    fine-tuned on prompt + answer saw, or it meets an unseen whitespace token at evaluation."""
    _, tokenizer = tiny
    for task in ("demo_choice", "demo_math"):
        for r in _records(f"{task}/test.json")[:10]:
            commonsense = task == "demo_choice"
            prompt = dd.eval_prompt(r["instruction"], commonsense)
            answer = r["output"].removeprefix("the correct answer is") if commonsense else r["output"]
            head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
            assert full[: len(head)] == head
