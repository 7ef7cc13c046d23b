#!/usr/bin/env bash
# Set up perft on a fresh CPU machine: a .venv with the pinned CPU torch first (an unpinned torch pulls several GB of
# CUDA packages), then the project with its dev extras at the exact versions it is tested with (constraints.txt;
# pyproject.toml keeps the supported ranges). Idempotent: a second run with nothing changed takes about a second.
# Usage: bash scripts/setup.sh        (GPU machines: install torch 2.13.0 built for your CUDA first, then this)
# Newest releases inside pyproject's ranges instead, in a separate .venv-latest: bash scripts/test_latest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip byte-compiles what it installs, and that stays: with --no-compile a fresh set-up took 84 s instead of 103 s, but
# under PYTHONDONTWRITEBYTECODE=1 nothing is compiled later either, and importing perft's commands took 14 s, not 6.
# Whether torch is installed, not imported: an import costs seconds on every demo run and decides nothing more.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
fi
# The project install is redone only when what it is made from changed (pyproject.toml, constraints.txt): pip's own
# re-check of an unchanged install costs 15-25 s on every demo run. Delete .venv/.perft-setup to force it.
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
installed=0
if [ "$(cat .venv/.perft-setup 2>/dev/null)" != "$stamp" ] || ! .venv/bin/python -c "import perft_cli" 2>/dev/null
then
  # A version conflict with constraints.txt fails the script (its pip output shown), instead of passing unnoticed.
  if ! out=$(.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]" 2>&1); then
    printf '%s\n' "$out" >&2
    exit 1
  fi
  printf '%s\n' "$out" | grep -v -e "^WARNING: Location" -e "^$" || true
  echo "$stamp" > .venv/.perft-setup
  installed=1
fi
versions="from importlib.metadata import version as v
print(f\"perft {v('perft-cli')}: torch {v('torch')}, transformers {v('transformers')}\")"
if [ "$installed" = 1 ]; then
  .venv/bin/python -c "import perft_cli, torch, transformers; $versions"  # a new install: prove that it imports
else
  .venv/bin/python -c "$versions"  # unchanged: importing torch and transformers only to print this took ~3 s a run
fi
