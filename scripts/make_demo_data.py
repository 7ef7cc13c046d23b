"""Regenerate the demo's synthetic data (byte-identical to the shipped files for the default seed).

    python scripts/make_demo_data.py --out demo/data

Writes train.json (demo_choice + demo_math, shuffled), demo_choice/test.json, demo_math/test.json and
pretrain.txt (the pretraining corpus, one sentence per line). Takes well under a second. The generator itself
lives in scripts/demo_data.py.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    demo_data = importlib.import_module("demo_data")  # scripts/ is on sys.path when run as a script
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo/data"), help="output directory")
    parser.add_argument("--seed", type=int, default=demo_data.SEED, help="world and task seed")
    args = parser.parse_args(argv)
    for path in demo_data.write_files(args.out, args.seed):
        print(f"{path}  ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
