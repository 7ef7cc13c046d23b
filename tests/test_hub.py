"""Loading a model or a training set by hub id when the hub cannot be reached: the cache answers at once, a miss
is one line.

The network is what is replaced here (``HfApi.model_info`` / ``dataset_info`` raising the error a failed connection
raises); the loading code, transformers, datasets and the libraries' offline mode run for real.
"""

from __future__ import annotations

import time

import datasets
import huggingface_hub
import pytest
from huggingface_hub import constants

from perft_cli import hub, modeling
from perft_cli.config import DataConfig, ModelConfig
from perft_cli.data import read_records
from perft_cli.errors import DataError, ModelError
from perft_cli.tiny import tiny_model


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty hub cache, online mode, a fresh probe memo, and a hub whose every request fails to connect."""
    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test, like the cache paths
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(hub, "_unreachable", {})
    return calls


def _cache(root, repo: str, files: dict[str, str]) -> None:
    """A hub cache entry as huggingface_hub writes it: refs/main -> snapshots/<commit>/<files>."""
    entry = root / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snap = entry / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)


def test_unreachable_hub_and_no_cache_is_one_line_at_once(no_network):
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as err:
        modeling.load_config(ModelConfig(name_or_path="allenai/OLMoE-1B-7B-0924"))
    msg = str(err.value)
    assert "\n" not in msg and "cannot be reached" in msg and "hf download allenai/OLMoE-1B-7B-0924" in msg
    # The config alone (kilobytes) is what perft plan needs, not the ~14 GB model: the hint says so.
    assert "hf download allenai/OLMoE-1B-7B-0924 config.json is all that perft plan and perft validate need" in msg
    assert time.perf_counter() - t0 < 5  # transformers alone retries for ~30 s
    assert no_network == ["allenai/OLMoE-1B-7B-0924"]
    with pytest.raises(ModelError, match="tokenizer of 'allenai/OLMoE-1B-7B-0924'.*cannot be reached") as err:
        modeling.load_tokenizer(ModelConfig(name_or_path="allenai/OLMoE-1B-7B-0924"))
    assert "config.json is all" not in str(err.value)  # a tokenizer needs its own files
    assert len(no_network) == 1  # probed once per process


def test_unreachable_hub_reads_a_cached_model(no_network, tmp_path):
    config = tiny_model("olmoe").config
    _cache(tmp_path / "hub", "someone/tiny-olmoe", {"config.json": config.to_json_string()})
    got, family = modeling.load_config(ModelConfig(name_or_path="someone/tiny-olmoe"))
    assert got.model_type == "olmoe" and got.num_experts == config.num_experts and family is not None
    assert constants.is_offline_mode()  # the rest of the run reads the cache without retrying the hub


def test_local_paths_are_never_probed(no_network, tmp_path):
    tiny_model("olmoe").config.save_pretrained(tmp_path / "m")
    modeling.load_config(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert no_network == [] and not constants.is_offline_mode()


def test_unreachable_hub_training_set_is_one_line_at_once(no_network):
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        read_records(DataConfig(train="someone/commonsense_170k"))
    msg = str(err.value)
    assert "\n" not in msg and "cannot be reached" in msg and "point data.train at the file" in msg
    assert time.perf_counter() - t0 < 5  # datasets alone retries for ~25 s
    assert no_network == ["someone/commonsense_170k"] and datasets.config.HF_HUB_OFFLINE
