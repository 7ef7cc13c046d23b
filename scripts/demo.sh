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
# Two threads, as the demo's published numbers were made with (demo/README.md: one thread's float sums differ).
# PASSIVE: a waiting OpenMP thread sleeps instead of spinning. The same threads split the same work (60 training
# steps: bitwise the same losses), but when another process holds a core, spinning made a run 10x slower (88 s
# against 9 s for 60 steps; evals 74 s against 3 s).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} TOKENIZERS_PARALLELISM=false
RUN=runs/demo-$(basename "$RECIPE" .yaml)-$(date +%Y%m%d-%H%M%S)
# One process for all four steps: each separate perft command paid ~8 s importing torch and transformers.
exec .venv/bin/perft demo "$RECIPE" --output-dir "$RUN" ${QUICK[@]+"${QUICK[@]}"}
