"""``train.sharding: fsdp`` on the CPU (gloo): the frozen base sharded by FSDP2, every rank training one adapter.

The multi-process runs go through ``torchrun`` as a user's would (platform.md: ``accelerate launch --cpu`` silently
runs one process). Each rank dumps its final adapter (PERFT_TEST_DUMP_ADAPTER), so the tests compare what every rank
holds, not only what rank 0 saved. The failure modes peers hit are each a test: ranks training different adapters
(transformers#48792: the checksum after every save), a saved adapter holding 1/world of each tensor (axolotl#3772:
saved == every rank's whole in-memory adapter), and a hang when an expert gets no tokens (ZeRO-3: routers zeroed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from safetensors.torch import load_file
from test_train import make_data, make_recipe
from typer.testing import CliRunner

from perft_cli.checkpoint import latest_checkpoint, load_adapter_weights
from perft_cli.cli import app
from perft_cli.config import load_recipe
from perft_cli.testing_hooks import DUMP_ENV, KILL_ENV, KILL_RANK_ENV
from perft_cli.train import run_train
from perft_cli.training.progress import read_metrics
from perft_cli.training.sharding import even_eval_batches, tensor_checksum

ROOT = Path(__file__).resolve().parents[1]
# Global batch 4 = two ranks x micro-batch 2 = one process x 2 accumulated micro-batches of 2. Dropout off, so both
# set-ups compute the same function; 5 held-out examples do not split evenly over 2 ranks (uneven eval forwards).
COMMON = {
    "adapter": {"dropout": 0.0},
    "data": {"val_size": 5},
    "train": {"max_steps": 4, "batch_size": 4, "micro_batch_size": 2, "eval_every": 2, "save_every": 2},
}


def torchrun(recipe: Path, *args: str, env: dict[str, str] | None = None, launch: list[str] | None = None):
    """``torchrun --standalone --nproc_per_node 2 -m perft_cli train RECIPE --set train.sharding=fsdp ARGS``."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    full.pop("PERFT_DEBUG", None)
    # --standalone picks a free rendezvous port (a fixed --master_port would clash with parallel test runs).
    launch = launch or ["--standalone", "--nproc_per_node", "2"]
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "perft_cli", "train", str(recipe)]
        + ["--set", "train.sharding=fsdp", *args],
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so a hang can be killed with its ranks
    )


def wait(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def dumps(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(folder / f"rank{r}.safetensors")) for r in range(2)]


def one_process(tmp_path: Path, model_dir: Path, data_file: Path, **sections) -> dict[str, torch.Tensor]:
    """The same recipe trained by one process (sharding none, accumulation 2): its last saved adapter."""
    torch.set_num_threads(1)
    run = tmp_path / "one" / "run"
    run_train(load_recipe(make_recipe(tmp_path / "one", model_dir, data_file, output_dir=str(run), **sections)))
    return load_adapter_weights(latest_checkpoint(run))


def assert_close(one: dict[str, torch.Tensor], other: dict[str, torch.Tensor], rel: float = 1e-4) -> None:
    assert one.keys() == other.keys()
    for k in one:
        err = float((one[k] - other[k]).norm() / one[k].norm().clamp_min(1e-12))
        assert err <= rel, (k, err)


def assert_every_rank_holds_the_saved_adapter(dump: Path, run: Path) -> None:
    rank0, rank1 = dumps(dump)
    saved = load_adapter_weights(latest_checkpoint(run))
    assert rank0.keys() == rank1.keys() == saved.keys()
    for k, t in saved.items():
        assert torch.equal(rank0[k], t) and torch.equal(rank1[k], t)
        # Trained whole: no half of a tensor left at zero, as a save of 1/world of each tensor would leave it.
        halves = t.reshape(-1).chunk(2)
        assert all(bool(h.abs().sum() > 0) for h in halves), k


def sharded_half(run: Path) -> dict:
    """summary.json's frozen_base_bytes: rank 0 held about half of the base (the proof that FSDP sharded it)."""
    base = json.loads((run / "summary.json").read_text())["frozen_base_bytes"]
    assert base["replicated"] == 0 and 0.45 < base["sharded"] / base["full"] < 0.55, base  # bf16/fp32: all shards
    return base


# --- fast: checks, pure helpers, the rank-agreement check, plan ----------------------------------------------


def test_fsdp_on_one_process_is_one_line_and_leaves_no_run_directory(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir("olmoe"))
    result = CliRunner().invoke(app, ["train", str(recipe), "--set", "train.sharding=fsdp"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "train.sharding: fsdp" in lines[0] and "torchrun --nproc_per_node" in lines[0]
    assert not (tmp_path / "run").exists()


def test_fsdp_with_device_map_is_one_line(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir("olmoe"))
    args = ["train", str(recipe), "--set", "train.sharding=fsdp", "--set", "model.device_map=auto"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "model.device_map" in lines[0] and "train.sharding" in lines[0]


def test_an_accelerate_fsdp_config_with_sharding_none_is_one_line(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for distributed_type: FSDP
    result = CliRunner().invoke(app, ["train", str(make_recipe(tmp_path, tiny_model_dir("olmoe")))])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--set train.sharding=fsdp" in lines[0]


def test_an_unknown_sharding_is_a_recipe_error(tmp_path, tiny_model_dir):
    result = CliRunner().invoke(
        app, ["plan", str(make_recipe(tmp_path, tiny_model_dir())), "--set", "train.sharding=zero3"]
    )
    assert result.exit_code == 1 and "train.sharding" in result.output and "fsdp" in result.output


def test_every_rank_runs_as_many_eval_forwards_and_each_example_counts_once():
    for n, world, size in ((5, 2, 2), (7, 4, 2), (1, 2, 4), (8, 2, 2)):
        per_rank = [even_eval_batches(n, r, world, size) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # a rank with one forward fewer would hang the others
        seen = sorted(i for b in per_rank for batch in b for i in batch)
        assert seen == list(range(n))


def test_checksum_sees_one_changed_bit():
    t = torch.randn(64, 8)
    for other in (t.clone(), t.to(torch.bfloat16)):
        flipped = other.clone()
        flipped.view(-1)[17] = torch.nextafter(flipped.view(-1)[17], torch.tensor(float("inf"), dtype=other.dtype))
        assert tensor_checksum(other) != tensor_checksum(flipped)
    assert tensor_checksum(t) == tensor_checksum(t.clone())


def _agreement_worker(rank: int, store: str, differ: bool, results: str) -> None:
    """One of two gloo processes: average gradients, then check agreement (rank 1 perturbed when ``differ``)."""
    import torch.distributed as dist

    from perft_cli.training.sharding import RanksDifferError, average_gradients, check_ranks_agree

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    p, q = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((3, 2), float(rank + 1))  # ranks 1 and 2 average to 1.5; q has no gradient on either
    average_gradients([p, q])
    out = {"p": p.grad.tolist(), "q": q.grad.tolist()}
    if differ and rank == 1:
        with torch.no_grad():
            q[2] += 1e-6
    try:
        check_ranks_agree([("a.perft_A", p), ("b.perft_B", q)], torch.device("cpu"), "the save of step 3")
        out["error"] = None
    except RanksDifferError as e:
        out["error"] = str(e)
    Path(results, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.mark.parametrize("differ", [False, True])
def test_gradients_are_averaged_and_ranks_that_differ_stop_loudly(tmp_path, differ):
    import torch.multiprocessing as mp

    mp.spawn(_agreement_worker, args=(str(tmp_path / "store"), differ, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["p"] == [[1.5, 1.5]] * 3 and r["q"] == [0.0] * 4
        if differ:  # both ranks stop, and say which tensor differs
            assert "1 of 2 tensors differ, first b.perft_B" in r["error"] and "step 3" in r["error"]
        else:
            assert r["error"] is None


def _plan(tmp_path: Path, *args: str) -> dict:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text((CONFIGS / "mixtral-8x7b" / "config.json").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {model}}}\n")
    result = CliRunner().invoke(app, ["plan", str(recipe), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["memory"]


def test_plan_estimates_per_rank_memory_under_fsdp(tmp_path):
    none = _plan(tmp_path)
    two, eight = (_plan(tmp_path, "--set", "train.sharding=fsdp", "--world-size", str(w)) for w in (2, 8))
    assert none["fsdp"] is None and two["fsdp"]["world_size"] == 2
    adapter = none["groups"]["adapters"]["bytes"]
    base = none["weights_bytes"] - adapter
    assert two["fsdp"]["sharded_bytes"] == pytest.approx(base / 2, rel=1e-6)  # bf16: all of the base shards
    assert eight["fsdp"]["sharded_bytes"] == pytest.approx(base / 8, rel=1e-6)
    assert two["fsdp"]["replicated_bytes"] == adapter
    # Activations and the adapter's optimizer state are per rank as before; only the weights term shrinks.
    rest = none["total_bytes"] - none["weights_bytes"]
    for est in (two, eight):
        f = est["fsdp"]
        assert est["total_bytes"] == f["sharded_bytes"] + f["replicated_bytes"] + f["gathered_bytes"] + rest
    assert eight["total_bytes"] < two["total_bytes"] < none["total_bytes"]
    # a bf16 base loads per rank (transformers' FSDP2 loader): its shards only
    assert two["load_peak_bytes"] == two["fsdp"]["sharded_bytes"] + two["fsdp"]["replicated_bytes"]

    nf4 = _plan(tmp_path, "--set", "train.sharding=fsdp", "--set", "model.quantization=nf4", "--world-size", "8")
    groups = nf4["groups"]
    # NF4 weights (the routed experts and the attention projections) stay whole on every rank
    low, high = groups["routed_experts"]["bytes"], groups["routed_experts"]["bytes"] + groups["attention"]["bytes"]
    assert low + adapter < nf4["fsdp"]["replicated_bytes"] <= high + adapter
    assert nf4["load_peak_bytes"] >= nf4["weights_bytes"]  # an nf4 base is read whole by every rank, then sharded


def test_plan_needs_the_world_size_for_fsdp(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS / "mixtral-8x7b" / "config.json").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name_or_path: {model}}}\ntrain: {{sharding: fsdp}}\n")
    result = CliRunner().invoke(app, ["plan", str(recipe)])
    assert result.exit_code == 1 and "--world-size" in result.output


# --- slow: torchrun runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_reference(tmp_path_factory, tiny_model_dir):
    """One uninterrupted 2-rank fsdp run of the tiny OLMoE (PERFT-R): (tmp, model dir, data, run dir, dump dir)."""
    tmp = tmp_path_factory.mktemp("fsdp-ref")
    model_dir, data = tiny_model_dir("olmoe"), make_data(tmp / "data.json", n=24)
    recipe = make_recipe(tmp / "fsdp", model_dir, data, output_dir=str(tmp / "fsdp" / "run"), **COMMON)
    proc = torchrun(recipe, env={DUMP_ENV: str(tmp / "dump")})
    err = wait(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "x 1 accumulation x 2 process(es); frozen base sharded across them (FSDP2)" in err
    return tmp, model_dir, data, tmp / "fsdp" / "run", tmp / "dump"


@pytest.mark.slow
def test_two_ranks_under_fsdp_train_the_adapter_one_process_trains(fsdp_reference):
    tmp, model_dir, data, run, dump = fsdp_reference
    assert_every_rank_holds_the_saved_adapter(dump, run)
    sharded_half(run)
    assert_close(one_process(tmp, model_dir, data, **COMMON), load_adapter_weights(latest_checkpoint(run)))
    losses = [[e.get("lm_loss", e.get("eval_loss")) for e in read_metrics(d)] for d in (run, tmp / "one" / "run")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.slow
def test_kill_9_of_one_rank_then_resume_auto_is_bitwise_exact(tmp_path, fsdp_reference):
    _, model_dir, data, reference, _ = fsdp_reference
    recipe = make_recipe(tmp_path, model_dir, data, output_dir=str(tmp_path / "run"), **COMMON)
    killed = torchrun(recipe, env={KILL_ENV: "2", KILL_RANK_ENV: "1"})  # rank 1 dies right after step 2's save
    err = wait(killed)
    assert killed.returncode != 0, err[-3000:]
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"
    resumed = torchrun(recipe, "--resume", "auto")
    err = wait(resumed)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed" in err and "step-00000002" in err
    got, want = (load_adapter_weights(latest_checkpoint(r)) for r in (tmp_path / "run", reference))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_two_node_launch_on_localhost_trains_the_same_adapter(tmp_path, fsdp_reference):
    """``torchrun --nnodes 2 --node_rank N`` with one process per "node": the multi-node code path on one machine."""
    _, model_dir, data, reference, _ = fsdp_reference
    recipe = make_recipe(tmp_path, model_dir, data, output_dir=str(tmp_path / "run"), **COMMON)
    port = str(_free_port())
    nodes = [
        torchrun(
            recipe,
            launch=["--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1"]
            + ["--master_addr", "127.0.0.1", "--master_port", port],
        )
        for n in range(2)
    ]
    errs = [wait(p) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    got, want = (load_adapter_weights(latest_checkpoint(r)) for r in (tmp_path / "run", reference))
    assert all(torch.equal(got[k], want[k]) for k in want)  # world 2 either way: the same adapter, bit for bit


@pytest.mark.slow
def test_accelerate_launch_with_an_fsdp2_config_trains_the_same_adapter(tmp_path, fsdp_reference):
    """``accelerate launch --config_file`` with ``distributed_type: FSDP`` (no GPU needed on this path): perft still
    shards the base itself (training/sharding.py says why), and the adapter is the torchrun run's, bit for bit."""
    _, model_dir, data, reference, _ = fsdp_reference
    recipe = make_recipe(tmp_path, model_dir, data, output_dir=str(tmp_path / "run"), **COMMON)
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\nnum_machines: 1\n"
        "machine_rank: 0\nuse_cpu: false\nfsdp_config:\n  fsdp_version: 2\n"
    )
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PERFT_DEBUG", None)
    proc = subprocess.Popen(
        [str(accelerate), "launch", "--config_file", str(config), "-m", "perft_cli", "train", str(recipe)]
        + ["--set", "train.sharding=fsdp"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    err = wait(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "x 2 process(es); frozen base sharded across them (FSDP2)" in err
    got, want = (load_adapter_weights(latest_checkpoint(r)) for r in (tmp_path / "run", reference))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_nf4_mixtral_under_fsdp_trains_the_adapter_one_process_trains(tmp_path, tiny_model_dir):
    """The packed 4-bit experts stay whole on every rank (FSDP-ignored); the rest of the base is sharded."""
    from perft_cli.tiny import save_tiny

    model_dir = save_tiny(tmp_path / "mixtral", "mixtral", seed=0, dtype=torch.bfloat16)
    data = make_data(tmp_path / "data.json", n=24)
    sections = {**COMMON, "model": {"quantization": "nf4", "dtype": "bfloat16"}}
    recipe = make_recipe(tmp_path / "fsdp", model_dir, data, output_dir=str(tmp_path / "fsdp" / "run"), **sections)
    proc = torchrun(recipe, env={DUMP_ENV: str(tmp_path / "dump")})
    err = wait(proc)
    assert proc.returncode == 0, err[-3000:]
    run = tmp_path / "fsdp" / "run"
    assert_every_rank_holds_the_saved_adapter(tmp_path / "dump", run)
    base = json.loads((run / "summary.json").read_text())["frozen_base_bytes"]
    assert base["replicated"] > 0 and base["sharded"] > 0  # NF4 whole, the bf16 rest in shards
    assert base["sharded"] + base["replicated"] < base["full"]
    assert_close(one_process(tmp_path, model_dir, data, **sections), load_adapter_weights(latest_checkpoint(run)))


@pytest.mark.slow
def test_lora_with_activation_checkpointing_and_experts_without_tokens(tmp_path, tiny_model_dir):
    """The LoRA baseline, activation checkpointing on, and routers zeroed so that every token ties on every expert
    and picks the same two: the other experts get no tokens on any rank, and nothing hangs (each FSDP unit is a whole
    layer, gathered whatever the router picks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = tiny_model_dir("olmoe")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
        out = model(input_ids=torch.arange(40).view(2, 20), output_router_logits=True)
    assert all(bool((r == 0).all()) for r in out.router_logits)  # all ties: torch.topk returns the same experts
    model_dir = tmp_path / "idle-experts"
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)

    data = make_data(tmp_path / "data.json", n=24)
    sections = {
        **COMMON,
        "adapter": {"variant": "lora", "dropout": 0.0, "rank": 4},
        "train": {**COMMON["train"], "gradient_checkpointing": True},
    }
    recipe = make_recipe(tmp_path / "fsdp", model_dir, data, output_dir=str(tmp_path / "fsdp" / "run"), **sections)
    proc = torchrun(recipe, env={DUMP_ENV: str(tmp_path / "dump")})
    err = wait(proc, timeout=240)
    assert proc.returncode == 0, err[-3000:]
    run = tmp_path / "fsdp" / "run"
    assert_every_rank_holds_the_saved_adapter(tmp_path / "dump", run)
    sharded_half(run)
    assert_close(one_process(tmp_path, model_dir, data, **sections), load_adapter_weights(latest_checkpoint(run)))


_LOAD_PROBE = """
import sys, torch.distributed as dist
dist.init_process_group("gloo")
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from perft_cli.config import ModelConfig
from perft_cli.modeling import load_model
model, _ = load_model(ModelConfig(name_or_path=sys.argv[1], dtype="float32"), shard=True)
params = list(model.named_parameters())
def half(p):  # a dim-0 shard of 2: at most ceil(rows / 2) rows
    return p.to_local().numel() * 2 <= p.numel() + p.shape[1:].numel()
whole = [n for n, p in params if not (isinstance(p, DTensor) and half(p))]
local = sum(p.to_local().numel() for _, p in params if isinstance(p, DTensor))
print("PROBE", isinstance(model, FSDPModule), len(params), "|".join(whole) or "-", local, flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_an_fsdp_load_reads_only_each_ranks_shards(tmp_path, tiny_model_dir):
    """A bf16 / fp32 base under train.sharding: fsdp comes from transformers' FSDP2 loader already sharded: every
    weight on every rank is a DTensor holding at most its half (the LM head, kept whole by the model's own FSDP
    plan, aside). benchmarks/fsdp_load_memory.py measures that the load's peak memory per rank halves too."""
    script = tmp_path / "probe.py"
    script.write_text(_LOAD_PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    out = subprocess.run([*cmd, str(tiny_model_dir("olmoe"))], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("PROBE")]
    assert len(rows) == 2
    for fsdp_module, n_params, whole, _ in rows:
        assert fsdp_module == "True" and int(n_params) > 0
        assert whole in ("-", "lm_head.weight"), whole
