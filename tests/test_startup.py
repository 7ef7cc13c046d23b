"""Start-up: `perft --help` and every `perft <command> --help` answer without importing torch or transformers.

Importing torch, transformers and accelerate takes 4-12 s on a small CPU; help, version and usage errors must not
pay it.
Each case runs in a fresh interpreter (this test process has torch imported already) and reports what was imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "accelerate", "datasets", "peft", "safetensors", "numpy")
PROBE = """
import json, sys
heavy = set(json.loads(sys.argv[2]))
sys.argv = ["perft", *json.loads(sys.argv[1])]
from perft_cli.cli import main
try:
    main()
except SystemExit:
    pass
finally:
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & heavy)), file=sys.stderr)
"""
COMMANDS = ["train", "plan", "eval", "merge", "inspect-routing", "generate", "validate", "demo", "recipes"]


def _heavy_imports(args: list[str]) -> list[str]:
    argv = json.dumps(args)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, argv, json.dumps(HEAVY)], capture_output=True, text=True, timeout=120
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([c, "--help"] for c in COMMANDS)], ids=" ".join)
def test_help_imports_no_torch(args):
    assert _heavy_imports(args) == []


def test_usage_error_imports_no_torch():
    assert _heavy_imports(["eval", "--no-such-option"]) == []
