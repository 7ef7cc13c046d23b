"""Shared fixtures: tiny random MoE model directories of every family and hand-made adapter checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: the tiny models gain nothing from two, and when another process holds a core, OpenMP's barriers make
# two-thread tiny ops hundreds of times slower (seen here: 0.07 s -> 27 s for one test). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "llm-adapters"
CONFIGS = Path(__file__).resolve().parent / "data" / "configs"


@pytest.fixture(scope="session")
def _empty_hub_tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub-tasks")
    (root / "mirror").mkdir()
    return root


@pytest.fixture(autouse=True)
def _no_hub_tasks(_empty_hub_tasks, monkeypatch):
    """Tests never reach the hub for eval tasks nor read a user's cache: an empty mirror and a cache of their own.

    Without this, tests that expect "no test file" errors would convert a hub dataset on a machine with internet.
    Tests of the hub path set their own mirror and cache (monkeypatch wins). The mirror stays empty, so nothing is
    ever converted into the shared cache.
    """
    monkeypatch.setenv("PERFT_HUB_TASKS_DIR", str(_empty_hub_tasks / "mirror"))
    monkeypatch.setenv("PERFT_CACHE", str(_empty_hub_tasks / "cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A function family -> directory of a saved tiny random model (safetensors + byte tokenizer), cached."""
    from perft_cli.tiny import save_tiny

    cache: dict[str, Path] = {}

    def make(family: str = "olmoe") -> Path:
        if family not in cache:
            cache[family] = save_tiny(tmp_path_factory.mktemp(f"tiny-{family}"), family, seed=0)
        return cache[family]

    return make


def make_checkpoint(ckpt_dir: Path, model_dir: Path, variant: str = "perft-r", seed: int = 1, **adapter) -> Path:
    """A checkpoint with random (non-trivial) adapter weights for ``model_dir``, in the run-directory layout."""
    from perft_cli.adapters import adapter_state, attach_adapter
    from perft_cli.checkpoint import write_checkpoint
    from perft_cli.config import recipe_from_dict
    from perft_cli.modeling import load_model

    adapter = {"variant": variant, "num_experts": 4, "top_k": 2, "rank": 4, **adapter}
    recipe = recipe_from_dict(
        {"model": {"name_or_path": str(model_dir), "dtype": "float32"}, "adapter": adapter, "output_dir": "unused"}
    )
    model, family = load_model(recipe.model)
    torch.manual_seed(seed)
    attach_adapter(model, recipe.adapter, family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("perft_B" in name or "lora_B" in name):
                p.normal_(0.0, 0.05)  # move away from the near-zero init so the adapter changes the output
    return write_checkpoint(
        ckpt_dir, adapter=adapter_state(model, variant), recipe=recipe, state={"step": 0, "handmade": True}
    )


def write_recipe(tmp_path: Path, raw: dict, **sections) -> Path:
    """Write ``raw`` (a recipe as a dict) to tmp_path/recipe.yaml, each keyword updating one section of it."""
    import yaml

    raw = dict(raw)
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


FAMILY_INPUT = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))  # [B, S] token ids


@pytest.fixture(scope="module")
def _tiny():
    """model type -> (tiny random model of it, its frozen logits on FAMILY_INPUT), built once per test module."""
    from perft_cli.tiny import tiny_model

    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            model = tiny_model(model_type)
            with torch.no_grad():
                cache[model_type] = (model, model(FAMILY_INPUT).logits)
        return cache[model_type]

    return get
