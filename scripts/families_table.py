"""The markdown table of every MoE model type in the installed transformers: supported, refused (why), or n/a.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/families_table.py > families.md

A model type counts as MoE when its modeling code routes experts through transformers' experts interface or its
config carries an expert count. Each is judged the way perft judges it at run time: ``family_for`` on the model type,
then ``find_moe_blocks`` on the tiny model of its config (``perft_cli.tiny.tiny_config``) built on the meta device.
A refusal prints the same one line as ``perft`` does. "tested" lists what tests/test_families.py checks for the types
in ``perft_cli.tiny.MATRIX``. Takes about a minute (every modeling module is imported).
"""

from __future__ import annotations

import re
import sys
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from perft_cli.arch import EXPERT_COUNT_NAMES, family_for, find_moe_blocks, uses_experts_interface  # noqa: E402
from perft_cli.errors import ModelError  # noqa: E402
from perft_cli.tiny import MATRIX, tiny_config  # noqa: E402

TESTED = "zero-init PERFT-R/E logits, perft_-only gradients, PERFT-E = router top-k, plan counts, NF4 <= 0.6 B/param"
EXPERTS_FIELD = re.compile(r"\b(" + "|".join(EXPERT_COUNT_NAMES) + r")\b")


def _config_source(model_type: str) -> str:
    import inspect

    try:
        return inspect.getsource(inspect.getmodule(CONFIG_MAPPING[model_type]))
    except (OSError, TypeError, KeyError, ImportError):
        return ""


def _keys(d) -> set[str]:
    """Every key of a config's dict, sub-configs (text_config, ffn_config, ...) included."""
    if isinstance(d, dict):
        return set(d) | {k for v in d.values() for k in _keys(v)}
    if isinstance(d, list):
        return {k for v in d for k in _keys(v)}
    return set()


def _has_experts(model_type: str) -> bool:
    """Does the config, or one of its sub-configs, declare an expert count? Vision / audio sub-configs do not."""
    try:
        keys = _keys(CONFIG_MAPPING[model_type]().to_dict())
    except Exception:  # noqa: BLE001 - a config that cannot build from its defaults: read its source instead
        return bool(EXPERTS_FIELD.search(_config_source(model_type)))
    return bool(keys & set(EXPERT_COUNT_NAMES))


def judge(model_type: str) -> tuple[str, str]:
    """(status, detail) of one model type: "supported", "refused" or "n/a"."""
    if not _has_experts(model_type):
        return "n/a", "not an MoE: its config declares no expert count"
    try:
        family = family_for(model_type)
    except ModelError as e:
        return "refused", str(e)
    try:
        config = tiny_config(model_type)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure of transformers' own build is reported, not raised
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return "supported", f"{family.display}; untested: its tiny config does not build ({type(e).__name__}: {first})"
    try:
        blocks = find_moe_blocks(model, family)
    except ModelError as e:
        return "refused", str(e)
    b = blocks[0]
    where = b.name.split(".", 3)[-1] if b.name.count(".") >= 3 else b.name
    shared = f", shared: {'/'.join(b.shared)}" if b.shared else ""
    layers = f"{len(blocks)} of {config.get_text_config().num_hidden_layers} layers"
    router = type(b.router).__name__
    tested = f"; tested: {TESTED}" if model_type in MATRIX else "; untested (not in tiny.MATRIX)"
    if not hasattr(b.experts, "has_gate"):  # outside transformers' experts interface: the NF4 path does not apply
        tested = tested.replace(", NF4 <= 0.6 B/param", "; NF4 does not apply: its experts stay bf16")
    return "supported", f"{family.display}: `{where}` ({layers} MoE), router {router}{shared}{tested}"


def moe_model_types() -> list[str]:
    return [t for t in CONFIG_MAPPING_NAMES if uses_experts_interface(t) or EXPERTS_FIELD.search(_config_source(t))]


def main() -> None:
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    rows = [(t, *judge(t)) for t in moe_model_types()]
    counts = Counter(status for _, status, _ in rows)
    print("| model type | status | detail |")
    print("|---|---|---|")
    for model_type, status, detail in rows:
        print(f"| `{model_type}` | {status} | {detail.replace('|', '/')} |")
    print()
    print(", ".join(f"{counts[s]} {s}" for s in ("supported", "refused", "n/a")) + f" ({len(rows)} model types)")


if __name__ == "__main__":
    main()
