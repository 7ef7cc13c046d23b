#!/usr/bin/env bash
# The embedded demo, from a fresh machine, on a CPU, in a few minutes, with no hub access:
#   1. set up .venv (scripts/setup.sh: pinned CPU torch first, then perft; skipped when nothing changed)
#   2. `perft demo`, in one process: train PERFT-R on the shipped tiny pretrained MoE (demo/tiny-moe,
#      recipes/demo.yaml), evaluate the frozen model ("before") and the adapted one ("after") on the two synthetic
#      tasks, show how tokens are routed before and after fine-tuning (terminal + HTML report), print the table
# Usage: bash scripts/demo.sh [--quick] [RECIPE]   (default recipes/demo.yaml; try recipes/demo_perft_e.yaml, ...)
#   --quick: 150 training steps instead of 800, 40 examples per task in each eval and in the routing report
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=()
if [ "${1:-}" = "--quick" ]; then
  QUICK=(--quick)
  shift
fi
RECIPE=${1:-recipes/demo.yaml}
bash scripts/setup.sh
if [ ! -f demo/tiny-moe/model.safetensors ]; then
  # Not shipped yet (see demo/README.md): pretrain it once from the committed, seeded script (~10-15 min on 2 cores).
  echo "== 0/4 demo/tiny-moe is missing: pretraining it (scripts/pretrain_tiny_moe.py)"
  .venv/bin/python scripts/pretrain_tiny_moe.py --out demo/tiny-moe
fi
# One thread: at the demo's tiny width a second thread costs more than it gives (800 steps: 112 s against 136 s
# with two, 2026-12-02), and demo/README.md's table was made with one. PASSIVE: a waiting OpenMP thread sleeps
# instead of spinning (the same numbers; with two threads and another process holding a core, spinning made a run
# 10x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} TOKENIZERS_PARALLELISM=false
RUN=runs/demo-$(basename "$RECIPE" .yaml)-$(date +%Y%m%d-%H%M%S)
# One process for all four steps: each separate perft command paid ~8 s importing torch and transformers.
exec .venv/bin/perft demo "$RECIPE" --output-dir "$RUN" ${QUICK[@]+"${QUICK[@]}"}
