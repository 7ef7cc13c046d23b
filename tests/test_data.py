"""Data pipeline: reading and checking records, the LLM-Adapters tokenisation, the held-out split, batch order."""

from __future__ import annotations

import json

import pytest
import torch

from perft_cli.config import DataConfig
from perft_cli.data import (
    IGNORE_INDEX,
    Examples,
    collate,
    epoch_batches,
    rank_micro_batches,
    read_records,
    split_indices,
    tokenize,
)
from perft_cli.errors import DataError
from perft_cli.prompts import train_prompt
from perft_cli.tiny import byte_tokenizer

RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "hi", "answer": "hi"},
    {"instruction": "Add 2 and 3.", "input": "", "output": "2 + 3 = 5. The answer is 5.", "answer": 5},
    {"instruction": "Translate.", "input": "chat", "output": "cat"},
]


def write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_reads_json_list_and_jsonl(tmp_path):
    a, src = read_records(DataConfig(train=write(tmp_path / "d.json", RECORDS)))
    jsonl = "\n".join(json.dumps(r) for r in RECORDS) + "\n\n"
    b, _ = read_records(DataConfig(train=write(tmp_path / "d.jsonl", jsonl)))
    c, _ = read_records(DataConfig(train=write(tmp_path / "lines.json", jsonl)))  # JSON Lines named .json
    assert a == b == c and src.endswith("d.json")
    assert a[1]["answer"] == "5" and a[2]["answer"] == "" and a[0]["input"] == ""


def test_field_mapping(tmp_path):
    rows = [{"question": "q?", "response": "r", "extra": 1}]
    got, _ = read_records(
        DataConfig(train=write(tmp_path / "d.json", rows), fields={"instruction": "question", "output": "response"})
    )
    assert got == [{"instruction": "q?", "input": "", "output": "r", "answer": ""}]


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', "line 2, column"),
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "record 2: field 'output' is missing"),
        ([{"instruction": "a", "output": 3}], "record 1: field 'output' must be a string, got int"),
        ([{"instruction": "  ", "output": "x"}], "record 1: field 'instruction' is empty"),
        ([{"instruction": "a", "output": "b"}, "text"], "record 2 is a str"),
        ([], "holds no records"),
        ({"instruction": "a"}, "expected a JSON list"),
    ],
)
def test_bad_json_named_precisely(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(DataError, match=message) as e:
        read_records(DataConfig(train=path))
    assert "bad.json" in str(e.value) and "\n" not in str(e.value)


def test_bad_jsonl_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3 is not valid JSON"):
        read_records(DataConfig(train=path))


def test_missing_file_and_unset(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(DataConfig(train=str(tmp_path / "nope.json")))
    with pytest.raises(DataError, match="data.train is not set"):
        read_records(DataConfig())


def test_hub_dataset_unreachable_is_one_line(monkeypatch):
    # No hub here: offline mode makes datasets fail at once instead of retrying for ~25 s.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="cannot load hub dataset 'someone/commonsense_170k'") as e:
        read_records(DataConfig(train="someone/commonsense_170k"))
    assert "\n" not in str(e.value) and "point data.train at the file" in str(e.value)


def test_tokenize_reference_behaviour():
    tok = byte_tokenizer()
    recs = [{"instruction": "Say hi.", "input": "", "output": "hi", "answer": ""}]
    full = train_prompt("Say hi.", "", "hi")
    ex = tokenize(recs, tok, DataConfig(cutoff_len=512))
    assert ex.input_ids[0] == tok(full)["input_ids"] + [tok.eos_token_id]  # EOS appended: it fits
    assert ex.labels[0] == ex.input_ids[0]  # train_on_inputs: loss on the whole sequence (reference)
    cut = tokenize(recs, tok, DataConfig(cutoff_len=20))
    assert len(cut.input_ids[0]) == 20 and cut.input_ids[0][-1] != tok.eos_token_id  # truncated: no EOS
    no_eos = tokenize(recs, tok, DataConfig(cutoff_len=512, add_eos=False))
    assert no_eos.input_ids[0][-1] != tok.eos_token_id


def test_response_only_loss():
    tok = byte_tokenizer()
    recs = [{"instruction": "Say hi.", "input": "", "output": "hi", "answer": ""}]
    ex = tokenize(recs, tok, DataConfig(cutoff_len=512, train_on_inputs=False))
    n_prompt = len(tok(train_prompt("Say hi.", "", ""))["input_ids"])
    assert ex.labels[0][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex.labels[0][n_prompt:] == ex.input_ids[0][n_prompt:] and len(ex.labels[0]) == n_prompt + 3  # h, i, EOS


def test_split_matches_datasets_train_test_split():
    from datasets import Dataset

    n, val = 500, 120
    ref = Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=val, shuffle=True, seed=42)
    train, test = split_indices(n, val, 42)
    assert test.tolist() == ref["test"]["i"] and train.tolist() == ref["train"]["i"]
    assert split_indices(n, 0, 42)[1].size == 0


def test_batch_order_is_deterministic_and_covers_each_epoch():
    lengths = [(i * 37) % 100 + 1 for i in range(103)]
    a = epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert a == epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=False)
    assert a != epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=False)
    flat = [i for b in a for i in b]
    assert len(a) == 103 // 8 and len(set(flat)) == len(flat) == 96  # last incomplete batch dropped
    g = epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=True)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(g) < padding(a) / 3
    assert len({i for b in g for i in b}) == 96 and all(len(b) == 8 for b in g)


def test_rank_micro_batches_partition():
    batch = list(range(16))
    parts = [rank_micro_batches(batch, r, 2, 4) for r in range(2)]
    assert parts == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9, 10, 11], [12, 13, 14, 15]]]


def test_collate_pads_right():
    ex = Examples([[5, 6, 7], [8]], [[5, 6, 7], [IGNORE_INDEX]])
    b = collate(ex, [0, 1], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [IGNORE_INDEX] * 3]
    assert b["input_ids"].dtype == torch.long
