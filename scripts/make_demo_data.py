"""Regenerate the demo's synthetic data (byte-identical to the shipped files for the default seed).

    python scripts/make_demo_data.py --out demo/data

Writes train.json (demo_choice + demo_math, shuffled), demo_choice/test.json, demo_math/test.json and
pretrain.txt (the pretraining corpus, one sentence per line). Takes well under a second. The generator itself
lives in scripts/demo_data.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def _load_demo_data():
    spec = importlib.util.spec_from_file_location("demo_data", Path(__file__).with_name("demo_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_data"] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    demo_data = _load_demo_data()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo/data"), help="output directory")
    parser.add_argument("--seed", type=int, default=demo_data.SEED, help="world and task seed")
    args = parser.parse_args(argv)
    for path in demo_data.write_files(args.out, args.seed):
        print(f"{path}  ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
