"""Train every PERFT variant and the LoRA baseline on the demo tasks and print a table like the paper's.

Run:  .venv/bin/python benchmarks/demo_table.py [--steps 150] [--out runs/demo-table]     (~10 min on 2 CPU cores)

Each row fine-tunes the shipped tiny MoE (demo/tiny-moe) with recipes/demo.yaml and the row's adapter, at
comparable activated parameters per token (4,096 to 4,608 per MoE layer on the demo model, D = 128), then evaluates
with the paper's protocol. The frozen model is the first row. Whatever the numbers show is printed as is; one seed,
so differences of a few points are noise. The table is also written to OUT/table.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from perft_cli.config import load_recipe
from perft_cli.evaluate import run_eval
from perft_cli.plan import run_plan
from perft_cli.train import run_train

ROOT = Path(__file__).resolve().parents[1]

# (label, adapter overrides): activated per MoE layer = 4,096 (E, D, S, LoRA) or 4,608 (R: + its N x D router).
ROWS = [
    ("PERFT-R", ["adapter.variant=perft-r", "adapter.num_experts=4", "adapter.top_k=2", "adapter.rank=8"]),
    ("PERFT-E", ["adapter.variant=perft-e", "adapter.rank=8"]),
    ("PERFT-D", ["adapter.variant=perft-d", "adapter.num_experts=2", "adapter.rank=8"]),
    ("PERFT-S", ["adapter.variant=perft-s", "adapter.rank=16"]),
    ("LoRA q,v", ["adapter.variant=lora", "adapter.rank=8"]),
]


def nkr(recipe, plan) -> str:
    a = recipe.adapter
    return {
        "perft-r": f"{a.num_experts}/{a.top_k}/{a.rank}",
        "perft-e": f"{plan['base_num_experts']}/{plan['base_top_k']}/{a.rank}",
        "perft-d": f"{a.num_experts}/all/{a.rank}",
        "perft-s": f"1/1/{a.rank}",
        "lora": f"r={a.rank}",
    }[a.variant]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the demo recipe's)")
    ap.add_argument("--out", default="runs/demo-table")
    args = ap.parse_args()
    out = Path(args.out)
    common = [f"train.max_steps={args.steps}"] if args.steps else []
    rows = []
    base = None
    for label, overrides in ROWS:
        run_dir = out / label.lower().replace(" ", "").replace(",", "")
        recipe = load_recipe(ROOT / "recipes" / "demo.yaml", [*common, *overrides, f"output_dir={run_dir}"])
        plan = run_plan(recipe)
        resume = "auto" if run_dir.exists() else None  # re-running the script continues or reuses finished rows
        run_train(recipe, resume=resume)
        if base is None:
            base = run_eval(ckpt=run_dir, base=True, json_path=out / "frozen.json")
        result = run_eval(ckpt=run_dir, json_path=run_dir / "eval.json")
        rows.append((label, nkr(recipe, plan), plan["trainable_params"], plan["activated_params"], result["tasks"]))

    tasks = list(rows[0][4])
    header = f"{'method':<10}{'N/K/r':>10}{'trainable':>11}{'activated':>11}" + "".join(f"{t:>13}" for t in tasks)
    print("\n" + header + f"{'avg':>8}")
    lines = [("frozen", "-", 0, 0, base["tasks"]), *rows]
    table = []
    for label, shape, trainable, activated, res in lines:
        accs = [res[t]["accuracy"] for t in tasks]
        avg = sum(accs) / len(accs)
        print(
            f"{label:<10}{shape:>10}{trainable:>11,}{activated:>11,}"
            + "".join(f"{a:>13.1%}" for a in accs)
            + f"{avg:>8.1%}"
        )
        table.append(
            dict(
                method=label,
                nkr=shape,
                trainable=trainable,
                activated=activated,
                accuracy={t: a for t, a in zip(tasks, accs, strict=True)},
                average=avg,
            )
        )
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"\ntable: {out / 'table.json'}")


if __name__ == "__main__":
    main()
