#!/usr/bin/env bash
# Run the test suite against the newest releases inside pyproject.toml's ranges instead of the pinned constraints.txt,
# in a separate .venv-latest (the pinned .venv of scripts/setup.sh is left alone). torch stays at 2.13.0 (installed
# first, and named again so that the eager upgrade keeps it: an unpinned torch pulls several GB of CUDA packages on a
# CPU machine); everything else is upgraded to its newest allowed release. Prints the versions that differ from
# constraints.txt, then runs pytest with the given arguments. Re-running upgrades again.
# Usage: bash scripts/test_latest.sh [pytest args]       e.g. bash scripts/test_latest.sh tests/test_config.py
# If it passes and the new versions should become the tested ones, regenerate constraints.txt (see its header).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-latest
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() {  # quiet, without this machine's "WARNING: Location" noise; on failure all of pip's output, and stop
  local out
  if ! out=$("$VENV/bin/pip" install -q --disable-pip-version-check "$@" 2>&1); then
    printf '%s\n' "$out" >&2
    exit 1
  fi
  printf '%s\n' "$out" | grep -v -e "^WARNING: Location" -e "^$" || true
}
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip_install torch==2.13.0
fi
# --upgrade-strategy eager: plain --upgrade would only upgrade perft itself and keep any dependency already present.
pip_install --upgrade --upgrade-strategy eager torch==2.13.0 -e ".[dev]"
"$VENV/bin/pip" freeze --exclude-editable --disable-pip-version-check | "$VENV/bin/python" -c '
import re, sys

def parse(lines):
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[re.sub(r"[-_.]+", "-", name).lower()] = version.split("+", 1)[0]  # torch 2.13.0+cpu is 2.13.0
    return out

pinned = parse(open("constraints.txt"))
latest = parse(sys.stdin)
rows = [(n, pinned.get(n, "-"), latest.get(n, "-")) for n in sorted(pinned.keys() | latest.keys())]
rows = [r for r in rows if r[1] != r[2]]
print(f"{len(rows)} version(s) differ from constraints.txt (pinned -> in .venv-latest; - is not there):")
for name, old, new in rows:
    print(f"  {name}: {old} -> {new}")
'
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
