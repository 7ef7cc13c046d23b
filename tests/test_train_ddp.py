"""Data parallel on CPU: two ranks under torchrun (gloo) end with identical adapters, equal to one process's run.

platform.md: `accelerate launch --cpu --num_processes 2` silently runs one process; `torchrun --nproc_per_node 2`
with Accelerator(cpu=True) really runs two. Each rank dumps its final adapter (PERFT_TEST_DUMP_ADAPTER) so the test
can compare what every rank holds, not only what rank 0 saved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_data, make_recipe

from perft_cli.checkpoint import latest_checkpoint, load_adapter_weights
from perft_cli.config import load_recipe
from perft_cli.testing_hooks import DUMP_ENV
from perft_cli.train import run_train
from perft_cli.training.progress import read_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_ranks_match_each_other_and_one_process(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("olmoe")
    data = make_data(tmp_path / "data.json", n=24)
    # Global batch 4: two ranks x micro-batch 2, or one process x 2 accumulated micro-batches of 2. Dropout off so
    # both see the same function; the token-normalised loss makes the two set-ups compute the same gradient.
    common = {
        "adapter": {"dropout": 0.0},
        "data": {"val_size": 4},
        "train": {"max_steps": 4, "batch_size": 4, "micro_batch_size": 2, "eval_every": 2, "save_every": 4},
    }
    ddp_recipe = make_recipe(tmp_path / "ddp", model_dir, data, output_dir=str(tmp_path / "ddp" / "run"), **common)
    dump = tmp_path / "dump"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", DUMP_ENV: str(dump)}
    env.pop("PERFT_DEBUG", None)
    # --standalone picks a free rendezvous port (a fixed --master_port would clash with parallel test runs).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*cmd, "-m", "perft_cli", "train", str(ddp_recipe)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a hang can be killed with its ranks
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert "x 1 accumulation x 2 process(es)" in stderr  # really two ranks

    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    saved = load_adapter_weights(latest_checkpoint(tmp_path / "ddp" / "run"))
    assert rank0.keys() == rank1.keys() == saved.keys()
    assert all(torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], saved[k]) for k in rank0)

    torch.set_num_threads(1)
    single = load_recipe(
        make_recipe(tmp_path / "one", model_dir, data, output_dir=str(tmp_path / "one" / "run"), **common)
    )
    run_train(single)
    one = load_adapter_weights(latest_checkpoint(tmp_path / "one" / "run"))
    assert all(torch.allclose(one[k], rank0[k], rtol=1e-3, atol=1e-5) for k in one)
    losses = [
        [e.get("lm_loss", e.get("eval_loss")) for e in read_metrics(d / "run")]
        for d in (tmp_path / "ddp", tmp_path / "one")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
