#!/usr/bin/env bash
# The embedded demo, from a fresh machine, on a CPU, in a few minutes, with no hub access:
#   1. set up .venv (scripts/setup.sh: pinned CPU torch first, then perft)
#   2. evaluate the shipped tiny pretrained MoE (demo/tiny-moe) on the two synthetic tasks: the "before" column
#   3. train PERFT-R on it (recipes/demo.yaml), 4. evaluate again: the "after" column
#   5. show how tokens are routed before and after fine-tuning (terminal + HTML report)
# Usage: bash scripts/demo.sh [--quick] [RECIPE]   (default recipes/demo.yaml; try recipes/demo_perft_e.yaml, ...)
#   --quick: 150 training steps instead of 800, 40 examples per task in each eval and in the routing report
set -euo pipefail
cd "$(dirname "$0")/.."
QUICK=()
EVAL_LIMIT=()
if [ "${1:-}" = "--quick" ]; then
  QUICK=(--set train.max_steps=150 --set train.eval_every=50 --set train.save_every=50)
  EVAL_LIMIT=(--limit 40)
  shift
fi
RECIPE=${1:-recipes/demo.yaml}
bash scripts/setup.sh
if [ ! -f demo/tiny-moe/model.safetensors ]; then
  # Not shipped yet (see demo/README.md): pretrain it once from the committed, seeded script (~10-15 min on 2 cores).
  echo "== 0/4 demo/tiny-moe is missing: pretraining it (scripts/pretrain_tiny_moe.py)"
  .venv/bin/python scripts/pretrain_tiny_moe.py --out demo/tiny-moe
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
RUN=runs/demo-$(basename "$RECIPE" .yaml)-$(date +%Y%m%d-%H%M%S)
P=.venv/bin/perft

echo "== 1/4 train $RECIPE -> $RUN"
$P train "$RECIPE" --output-dir "$RUN" ${QUICK[@]+"${QUICK[@]}"}
echo "== 2/4 evaluate the frozen model (before)"
$P eval --ckpt "$RUN" --base --json "$RUN/eval/before.json" ${EVAL_LIMIT[@]+"${EVAL_LIMIT[@]}"}
echo "== 3/4 evaluate with the trained adapter (after)"
$P eval --ckpt "$RUN" --json "$RUN/eval/after.json" ${EVAL_LIMIT[@]+"${EVAL_LIMIT[@]}"}
echo "== 4/4 routing before/after fine-tuning"
$P inspect-routing --ckpt "$RUN" --json "$RUN/routing.json" --html "$RUN/routing.html" ${EVAL_LIMIT[@]+"${EVAL_LIMIT[@]}"}

.venv/bin/python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
before, after = (json.load(open(f"{run}/eval/{n}.json"))["tasks"] for n in ("before", "after"))
print(f"\n{'task':<14}{'before':>9}{'after':>9}")
for task in after:
    print(f"{task:<14}{before[task]['accuracy']:>9.1%}{after[task]['accuracy']:>9.1%}")
print(f"\nresults in {run}/: eval/before.json, eval/after.json (+ .examples.jsonl), routing.html, metrics.jsonl")
PY
