#!/usr/bin/env bash
# Set up perft on a fresh CPU machine: a .venv with the pinned CPU torch first (an unpinned torch pulls several GB of
# CUDA packages), then the project with its dev extras. Idempotent: a second run only re-checks the install.
# Usage: bash scripts/setup.sh        (GPU machines: install the torch build for your CUDA first, then this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import perft_cli, torch, transformers; print(f'perft {perft_cli.__version__}: torch {torch.__version__}, transformers {transformers.__version__}')"
