"""`perft train` end to end on a tiny OLMoE: every variant learns, checkpoints hold only the adapter, resume is exact.

The resume and Ctrl-C tests run ``python -m perft_cli train`` in subprocesses (one thread each) so that a real
SIGKILL / SIGINT hits a real process; the rest runs in-process through ``run_train``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_recipe

from perft_cli.checkpoint import (
    ADAPTER_FILE,
    CKPT_DIR,
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_adapter_weights,
)
from perft_cli.config import load_recipe
from perft_cli.testing_hooks import KILL_ENV
from perft_cli.train import run_train
from perft_cli.training.collapse import CollapseWatch
from perft_cli.training.progress import read_metrics
from perft_cli.training.step import TrainingError

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]
LOSS_KEYS = ("step", "loss", "lm_loss", "base_aux_loss", "perft_aux_loss", "lr", "grad_norm", "eval_loss")


def make_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A learnable pattern in LLM-Adapters form: "Repeat red 2 times." -> "red red"."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        w, k = rng.choice(WORDS), rng.randint(1, 3)
        records.append(
            {"instruction": f"Repeat {w} {k} times.", "input": "", "output": " ".join([w] * k), "answer": w}
        )
    path.write_text(json.dumps(records))
    return path


def make_recipe(tmp_path: Path, model_dir: Path, data_file: Path | None = None, **sections) -> Path:
    """A recipe file for the tiny model: small adapter, 256-token cutoff (the template alone is ~230 bytes)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    raw = {
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "adapter": {"variant": "perft-r", "num_experts": 4, "top_k": 2, "rank": 4},
        "data": {"train": str(data_file or make_data(tmp_path / "data.json")), "cutoff_len": 256, "val_size": 8},
        "train": {
            "lr": 0.05,
            "max_steps": 24,
            "batch_size": 4,
            "micro_batch_size": 4,
            "warmup_steps": 2,
            "eval_every": 100,
            "save_every": 100,
        },
        "output_dir": str(tmp_path / "run"),
    }
    return write_recipe(tmp_path, raw, **sections)


@pytest.fixture(autouse=True)
def _one_thread():
    # Shared 2-core machines: one thread is faster than two contending ones, and keeps runs reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["perft-r", "perft-e", "perft-d", "perft-s", "lora"])
def test_every_variant_learns_and_saves_only_the_adapter(tmp_path, tiny_model_dir, variant):
    model_dir = tiny_model_dir("olmoe")
    recipe = load_recipe(make_recipe(tmp_path, model_dir, adapter={"variant": variant}))
    summary = run_train(recipe)
    run = Path(recipe.output_dir)
    steps = [e for e in read_metrics(run) if "lm_loss" in e]
    evals = [e["eval_loss"] for e in read_metrics(run) if "eval_loss" in e]
    first, last = sum(e["lm_loss"] for e in steps[:2]) / 2, sum(e["lm_loss"] for e in steps[-3:]) / 3
    assert len(steps) == 24 and summary["status"] == "done"
    assert last < first - 0.4, f"{variant}: loss {first:.3f} -> {last:.3f}"
    assert evals[-1] < evals[0] - 0.4, f"{variant}: eval loss {evals}"
    assert all(e["base_aux_loss"] > 0 for e in steps)  # OLMoE's own balance loss is on
    assert all((e["perft_aux_loss"] is not None) == (variant == "perft-r") for e in steps)
    for e in steps:  # loss = LM + 0.01 (OLMoE's router_aux_loss_coef) * base aux + 0.01 (recipe) * PERFT aux
        assert e["loss"] == pytest.approx(e["lm_loss"] + 0.01 * e["base_aux_loss"] + 0.01 * (e["perft_aux_loss"] or 0))

    # The run directory holds the adapter and training state, never the base weights.
    base = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    ckpt = latest_checkpoint(run)
    assert best_checkpoint(run) == ckpt and [c.name for c in list_checkpoints(run)] == ["step-00000024"]
    run_bytes = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    assert (ckpt / ADAPTER_FILE).stat().st_size < base / 20 and run_bytes < base / 5
    names = load_adapter_weights(ckpt)
    assert names and all(("perft_" in n) or ("lora_" in n) for n in names)
    assert json.loads((run / "summary.json").read_text())["trainable_params"] == summary["trainable_params"]
    assert (run / "recipe.yaml").is_file()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_training_runs_on_every_family(tmp_path, tiny_model_dir, family):
    recipe = make_recipe(
        tmp_path, tiny_model_dir(family), data={"cutoff_len": 64}, train={"max_steps": 2, "micro_batch_size": 2}
    )
    summary = run_train(load_recipe(recipe))
    steps = [e for e in read_metrics(tmp_path / "run") if "lm_loss" in e]
    assert summary["status"] == "done" and len(steps) == 2
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in steps)
    # DeepSeek returns no load-balancing loss: logged as null, and the start-up line says so.
    assert (steps[0]["base_aux_loss"] is None) == family.startswith("deepseek")


def test_activation_checkpointing_and_epochs(tmp_path, tiny_model_dir):
    """Activation checkpointing recomputes, it does not change the result; train.epochs sets the length."""
    model_dir, data = tiny_model_dir("olmoe"), make_data(tmp_path / "data.json", n=16)
    curves = []
    for checkpointing in (False, True):
        recipe = make_recipe(
            tmp_path / str(checkpointing),
            model_dir,
            data,
            data={"val_size": 4, "cutoff_len": 128},
            train={"max_steps": None, "epochs": 1.5, "gradient_checkpointing": checkpointing},
        )
        run_train(load_recipe(recipe))
        curves.append([e["loss"] for e in read_metrics(tmp_path / str(checkpointing) / "run") if "loss" in e])
    assert len(curves[0]) == 5  # 12 training examples / batch 4 = 3 steps per epoch, x 1.5 -> ceil 4.5
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import perft_cli.training.step as step

    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir("olmoe"), train={"max_steps": 8, "save_every": 2}))
    real, calls = step.token_nll_sum, {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == 7 else loss  # 2 eval micro-batches, then 1 per step

    monkeypatch.setattr(step, "token_nll_sum", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite training loss at step 5 .*step-00000004"):
        run_train(recipe)
    assert [c.name for c in list_checkpoints(Path(recipe.output_dir))] == ["step-00000004"]


def test_dry_run_json_prints_the_audit_and_accounting(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from perft_cli.cli import app

    pytest.importorskip("perft_cli.quant")
    recipe = make_recipe(tmp_path, tiny_model_dir("olmoe"), model={"quantization": "nf4", "dtype": "bfloat16"})
    result = CliRunner().invoke(app, ["train", str(recipe), "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr
    audit = json.loads(result.stdout)
    assert audit["quantization"] == "nf4" and audit["routed_experts"]["dtypes"] == ["nf4"]
    assert audit["routed_experts"]["bytes_per_param"] < 0.6  # 4 bits + block constants
    assert audit["accounting"]["trainable_params"] == 4 * 2 * 64 * 4 * 2 + 4 * 64 * 2  # N 2Dr + N D, 2 layers
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training
    table = CliRunner().invoke(app, ["train", str(recipe), "--dry-run"])
    assert table.exit_code == 0 and "routed_experts" in table.stdout and "adapter trainable" in table.stdout


def test_collapse_watch_reports_a_layer_once():
    watch = CollapseWatch(num_experts=4, top_k=2, share=0.9, steps=3)
    mask = torch.ones(1, 10)
    events = []
    for step in range(1, 7):
        always_0 = torch.stack([torch.zeros(10, dtype=torch.long), torch.arange(10) % 3 + 1], dim=1)  # [T, K]
        balanced = torch.stack([torch.arange(10) % 4, (torch.arange(10) + 1) % 4], dim=1)
        watch.add([(0, always_0), (1, balanced)], mask)
        top, new = watch.end_step(step)
        assert top == 1.0
        events += new
    assert events == [{"step": 3, "event": "routing_collapse", "layer": 0, "expert": 0, "share": 1.0}]
    assert not CollapseWatch(num_experts=2, top_k=2, share=0.9).enabled  # K = N: every expert always chosen


# ---------------------------------------------------------------------------------------------------------------
# Subprocess runs: exact resume after SIGKILL, Ctrl-C


def perft(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    full.pop("PERFT_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "perft_cli", "train", *args],
        cwd=ROOT,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C in the terminal running pytest does not reach it; killpg on hangs
        # A job started in the background by a non-interactive shell (as CI may be) inherits SIGINT ignored, and
        # Python then never turns it into KeyboardInterrupt: the child gets the default a user's terminal gives.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kwargs,
    )


def wait(proc: subprocess.Popen, timeout: float = 240) -> str:
    """Wait for a run; returns its stderr. A hang is killed (with any children) rather than left behind."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def curve(run: Path) -> list[dict]:
    return [{k: e[k] for k in LOSS_KEYS if k in e} for e in read_metrics(run) if "event" not in e]


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("olmoe")
    data = make_data(tmp_path / "data.json", n=24)  # 20 train / 4 held out: 5 steps per epoch, resume crosses one
    common = {
        "data": {"val_size": 4, "group_by_length": True},
        # dropout on (RNG state matters), accumulation 2 (micro-batch order matters)
        "adapter": {"dropout": 0.1},
        "train": {"max_steps": 8, "batch_size": 4, "micro_batch_size": 2, "eval_every": 3, "save_every": 4},
    }
    recipe_a = make_recipe(tmp_path / "a", model_dir, data, output_dir=str(tmp_path / "a" / "run"), **common)
    recipe_b = make_recipe(tmp_path / "b", model_dir, data, output_dir=str(tmp_path / "b" / "run"), **common)
    straight = perft([str(recipe_a)])
    killed = perft([str(recipe_b)], env={KILL_ENV: "4"})
    err_a, err_b = wait(straight), wait(killed)
    assert straight.returncode == 0, err_a[-2000:]
    assert killed.returncode == -signal.SIGKILL, err_b[-2000:]
    run_a, run_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    assert latest_checkpoint(run_b).name == "step-00000004"

    # A save killed half-way leaves a temporary directory: resume must ignore it (and the next save clean it up).
    stale = run_b / CKPT_DIR / ".tmp-step-00000006"
    stale.mkdir()
    (stale / ADAPTER_FILE).write_bytes(b"partial")
    (stale / "trainer_state.json").write_text("{")

    resumed = perft([str(recipe_b), "--resume", "auto"])
    err_c = wait(resumed)
    assert resumed.returncode == 0, err_c[-2000:]
    assert "resumed" in err_c and "step-00000004" in err_c and not stale.exists()

    final_a, final_b = load_adapter_weights(latest_checkpoint(run_a)), load_adapter_weights(latest_checkpoint(run_b))
    assert latest_checkpoint(run_b).name == "step-00000008" and final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a), "adapter weights differ after resume"
    assert curve(run_a) == curve(run_b) and len(curve(run_a)) > 8


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_130(tmp_path, tiny_model_dir):
    recipe = make_recipe(tmp_path, tiny_model_dir("olmoe"), train={"max_steps": 10_000, "save_every": 10_000})
    proc = perft([str(recipe), "--resume", "auto"])  # nothing to resume yet: starts fresh and says so
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum('"lm_loss"' in line for line in metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = wait(proc, timeout=120)
    assert proc.returncode == 130, err[-2000:]
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt is not None and int(ckpt.name.split("-")[1]) >= 2
    assert "starting a fresh run" in err and "Traceback" not in err
    assert f"saved {ckpt}" in err and f"Resume with: perft train {recipe} --resume auto" in err


# ---------------------------------------------------------------------------------------------------------------
# Resume with changed settings, from an older checkpoint, and after crashes around a save (in-process)


def _lrs(run: Path) -> dict[int, float]:
    return {e["step"]: e["lr"] for e in read_metrics(run) if "lr" in e}


def test_resume_applies_the_recipes_lr_weight_decay_and_schedule(tmp_path, tiny_model_dir):
    """The checkpoint brings the optimizer's moments and the schedule's position, the recipe its hyperparameters:
    a resumed run with another lr / max_steps follows the new schedule from the next step (no step at lr 0)."""
    model_dir = tiny_model_dir("olmoe")
    data = make_data(tmp_path / "data.json", n=40)
    short = {"train": {"max_steps": 6, "warmup_steps": 2, "save_every": 3}}
    recipe = load_recipe(make_recipe(tmp_path / "a", model_dir, data, **short))
    run_train(recipe)
    run = Path(recipe.output_dir)
    longer = {"train": {"max_steps": 10, "warmup_steps": 2, "save_every": 3, "lr": 0.02, "weight_decay": 0.1}}
    resumed = load_recipe(make_recipe(tmp_path / "a", model_dir, data, output_dir=str(run), **longer))
    run_train(resumed, resume="auto")
    fresh = load_recipe(make_recipe(tmp_path / "f", model_dir, data, **longer))
    run_train(fresh)
    got, want = _lrs(run), _lrs(Path(fresh.output_dir))
    assert got[6] == pytest.approx(0.05 / 4)  # the first run's own schedule up to its end
    assert [got[s] for s in range(7, 11)] == pytest.approx([want[s] for s in range(7, 11)]) and got[7] > 0
    state = json.loads((latest_checkpoint(run) / "optimizer.json").read_text())
    assert {g["weight_decay"] for g in state["param_groups"]} == {0.1}


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("olmoe")
    sections = {"train": {"max_steps": 6, "save_every": 2, "eval_every": 100}}
    recipe = load_recipe(make_recipe(tmp_path, model_dir, **sections))
    run_train(recipe)
    run = Path(recipe.output_dir)
    # Keep step 2 (pruning leaves latest + best only): copy it back from a second, shorter run of the same recipe.
    assert [c.name for c in list_checkpoints(run)] == ["step-00000006"]
    short = load_recipe(make_recipe(tmp_path / "s", model_dir, tmp_path / "data.json", train={"max_steps": 2}))
    run_train(short)
    older = run / CKPT_DIR / "step-00000002"
    shutil.copytree(latest_checkpoint(Path(short.output_dir)), older)

    summary = run_train(recipe, resume=str(older))
    assert summary["step"] == 6 and summary["status"] == "done"
    assert [c.name for c in list_checkpoints(run)] == ["step-00000006"]  # this continuation's, not pruned away
    (aside,) = (run / "abandoned").iterdir()
    assert aside.name.startswith("after-step-00000002-") and [p.name for p in aside.iterdir()] == ["step-00000006"]
    assert [e["step"] for e in read_metrics(run) if "lm_loss" in e] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_new_lora_scale_and_warns_on_other_adapter_changes(tmp_path, tiny_model_dir, capsys):
    from perft_cli.errors import CheckpointError

    model_dir = tiny_model_dir("olmoe")
    recipe = load_recipe(make_recipe(tmp_path, model_dir, train={"max_steps": 2}))
    run_train(recipe)
    run = str(Path(recipe.output_dir))
    scaled = load_recipe(make_recipe(tmp_path, model_dir, output_dir=run, adapter={"alpha": 80.0}))
    with pytest.raises(CheckpointError, match="adapter.alpha=8.0, this recipe has adapter.alpha=80.0"):
        run_train(scaled, resume="auto")
    # alpha 8.0 is what the first run had (None = 2 * rank): accepted; the new dropout is named in the warning.
    changed = {"adapter": {"alpha": 8.0, "dropout": 0.3}, "train": {"max_steps": 3}}
    run_train(load_recipe(make_recipe(tmp_path, model_dir, output_dir=run, **changed)), resume="auto")
    assert "adapter.dropout" in capsys.readouterr().err


def test_best_json_follows_the_resumed_state_and_a_split_resave_is_not_lost(tmp_path, tiny_model_dir):
    from perft_cli.checkpoint import BEST_FILE, clean_stale, step_dir, write_best

    model_dir = tiny_model_dir("olmoe")
    recipe = load_recipe(make_recipe(tmp_path, model_dir, train={"max_steps": 4, "eval_every": 2, "save_every": 2}))
    run_train(recipe)
    run = Path(recipe.output_dir)
    best = best_checkpoint(run)
    state = json.loads((latest_checkpoint(run) / "trainer_state.json").read_text())
    assert best == step_dir(run, state["best_step"])
    # A crash between the best save and best.json: best.json still names another (older) checkpoint. Restoring the
    # trainer state puts it back on the state's best (which pruning then keeps).
    from types import SimpleNamespace

    from perft_cli.training.state import _reconcile_best

    other = step_dir(run, 1)
    shutil.copytree(best, other)
    write_best(run, other, 99.0, 1)
    _reconcile_best(SimpleNamespace(run_dir=run), state)
    assert best_checkpoint(run) == best and json.loads((run / BEST_FILE).read_text())["eval_loss"] != 99.0
    shutil.rmtree(other)

    # A re-save killed between its two renames: both copies complete under .tmp names, the step itself missing.
    last = latest_checkpoint(run)
    root = run / CKPT_DIR
    shutil.copytree(last, root / f".tmp-old-{last.name}")
    os.replace(last, root / f".tmp-{last.name}")
    assert latest_checkpoint(run) != last
    clean_stale(run)
    assert latest_checkpoint(run) == last and not list(root.glob(".tmp-*"))


def test_collapse_watch_state_survives_a_checkpoint():
    mask = torch.ones(1, 10)
    always_0 = torch.stack([torch.zeros(10, dtype=torch.long), torch.arange(10) % 3 + 1], dim=1)  # [T, K]
    straight, first = CollapseWatch(4, 2, 0.9, steps=4), CollapseWatch(4, 2, 0.9, steps=4)
    events = []
    for step in range(1, 3):
        for w in (straight, first):
            w.add([(0, always_0)], mask)
        events.append(straight.end_step(step)[1])
        first.end_step(step)
    resumed = CollapseWatch(4, 2, 0.9, steps=4)
    resumed.load(json.loads(json.dumps(first.state())))  # through the checkpoint's JSON
    for step in range(3, 7):
        for w in (straight, resumed):
            w.add([(0, always_0)], mask)
        assert straight.end_step(step)[1] == resumed.end_step(step)[1]
    assert resumed.reported == {0}


def test_summary_throughput_counts_training_steps_only(tmp_path, tiny_model_dir):
    model_dir = tiny_model_dir("olmoe")
    recipe = load_recipe(make_recipe(tmp_path, model_dir, train={"max_steps": 4, "eval_every": 1, "save_every": 1}))
    summary = run_train(recipe)
    assert 0 < summary["train_time_s"] < summary["time_s"]
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_time_s"])


# --- faults that used to escape as tracebacks or double writes (issue 17) ----------------------------------------


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from perft_cli.errors import CheckpointError

    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir("olmoe"), train={"max_steps": 4, "save_every": 2}))
    real, calls = safetensors.torch.save_file, []

    def fills_up(*args, **kwargs):  # the first checkpoint's three files fit, then the disk is full
        calls.append(args[1])
        if len(calls) > 3:
            io = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            raise SafetensorError(f"Error while serializing: {io}")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    with pytest.raises(CheckpointError) as e:
        run_train(recipe)
    run = Path(recipe.output_dir)
    message = str(e.value)
    assert "\n" not in message and "No space left on device" in message, message
    assert f"cannot write the checkpoint {run / CKPT_DIR / 'step-00000004'}" in message
    assert f"the last complete checkpoint, {run / CKPT_DIR / 'step-00000002'}, is kept" in message
    assert [p.name for p in (run / CKPT_DIR).iterdir()] == ["step-00000002"]  # no .tmp-* left behind
    assert latest_checkpoint(run).name == "step-00000002"


def test_a_truncated_trainer_state_is_one_line_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    import perft_cli.modeling
    from perft_cli.errors import CheckpointError

    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir("olmoe"), train={"max_steps": 2}))
    run_train(recipe)
    state = latest_checkpoint(Path(recipe.output_dir)) / "trainer_state.json"
    state.write_text(state.read_text()[:40])  # cut short, as by a disk that filled up outside perft

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(perft_cli.modeling, "load_model", refuse)
    with pytest.raises(CheckpointError, match=r"cannot be resumed: trainer_state.json: JSONDecodeError: .*damaged"):
        run_train(recipe, resume="auto")


def test_a_second_run_on_the_same_directory_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, tiny_model_dir):
    from perft_cli.errors import CheckpointError

    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir("olmoe"), train={"max_steps": 2}))
    run = Path(recipe.output_dir)
    run.mkdir(parents=True)
    holder = subprocess.Popen(  # a perft train of its own, holding the run directory (as during its training)
        [
            sys.executable,
            "-c",
            f"from perft_cli.training.setup import lock_run_dir; lock_run_dir({str(run)!r}); "
            "print('held', flush=True); import time; time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"is being trained by another perft train \(pid {holder.pid}\)"):
            run_train(recipe)
        assert not (run / CKPT_DIR).exists()  # the refused run wrote nothing
    finally:
        os.killpg(holder.pid, signal.SIGKILL)  # a crash: the kernel drops its lock
        holder.wait()
    summary = run_train(recipe)  # no stale lock to clear by hand
    assert summary["status"] == "done" and not (run / ".perft-train.lock").exists()


# --- seeing a run: ETA in plain logs, loss.png, the step-0 eval in the summary (issue 17) --------------------------


def test_a_plain_log_gets_a_line_with_eta_at_least_every_30_s(monkeypatch, capsys):
    from perft_cli.training import progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = progress.TrainProgress(total=1000, start=0)  # stderr is not a terminal under pytest: plain lines
    entry = {"epoch": 0.0, "loss": 1.0, "lm_loss": 1.0, "lr": 1e-3, "tokens_per_s": 100.0}
    for step in (1, 2, 3):  # not a 5% step, under 30 s: silent
        clock[0] += 5.0
        bar.update({**entry, "step": step})
    assert capsys.readouterr().err == ""
    clock[0] += 20.0  # 35 s since the start: a line, with the ETA from 35 s per 4 steps
    bar.update({**entry, "step": 4})
    line = capsys.readouterr().err.strip()
    assert line.startswith("step 4/1000 ") and line.endswith("ETA 2:25:15"), line  # 996 steps x 8.75 s = 8715 s


def test_a_run_draws_loss_png_and_its_summary_names_the_step0_eval(tmp_path, tiny_model_dir):
    pytest.importorskip("matplotlib", reason="loss.png needs matplotlib (the plot extra)")
    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir("olmoe"), train={"max_steps": 3}))
    summary = run_train(recipe)
    run = Path(recipe.output_dir)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["first_eval_step"] == 0 and summary["first_eval_loss"] is not None
    assert summary["last_eval_step"] == 3 and summary["best_step"] == 3
    saved = json.loads((run / "summary.json").read_text())
    assert saved["first_eval_loss"] == summary["first_eval_loss"]
    steps = [e for e in read_metrics(run) if "loss" in e]  # PERFT-R: its routers' load per layer, NeMo's names
    assert all(len(e["perft_load"]) == 2 and set(e["perft_load"][0]) >= {"layer", "util_median"} for e in steps)


def test_an_update_that_diverges_is_never_saved(tmp_path, tiny_model_dir, monkeypatch):
    """Finite loss and gradients, but the step itself overflows a weight: the run stops before saving that state."""
    import perft_cli.train

    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir("olmoe"), train={"max_steps": 8, "save_every": 1}))
    real, calls = perft_cli.train.apply_update, {"n": 0}

    def overflowing(run):
        lr = real(run)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                run.params[0].view(-1)[0] = float("inf")
        return lr

    monkeypatch.setattr(perft_cli.train, "apply_update", overflowing)
    with pytest.raises(
        TrainingError, match=r"the update of step 3 made adapter weights non-finite \(.*perft_.*step-00000002"
    ):
        run_train(recipe)
    run = Path(recipe.output_dir)
    assert not (run / CKPT_DIR / "step-00000003").exists()  # the diverged state was not written
    assert latest_checkpoint(run).name == "step-00000002"
    weights = load_adapter_weights(latest_checkpoint(run))
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["final-eval", "summary"])
def test_ctrl_c_after_the_last_step_exits_130_with_the_run_complete(tmp_path, tiny_model_dir, stage):
    from perft_cli.testing_hooks import SIGINT_ENV

    recipe = make_recipe(tmp_path, tiny_model_dir("olmoe"), train={"max_steps": 3})
    proc = perft([str(recipe)], env={SIGINT_ENV: stage})
    err = wait(proc, timeout=180)
    assert proc.returncode == 130, (proc.returncode, err[-2000:])  # not killed by the signal, not 0 or 1
    assert "Traceback" not in err and "Aborted" not in err
    last = latest_checkpoint(tmp_path / "run")
    assert last is not None and last.name == "step-00000003"
    assert f"the run is complete{';' if stage == 'final-eval' else ' and'} saved" in err, err[-2000:]


def test_resume_from_a_wrong_shaped_adapter_is_one_line_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors.torch import load_file, save_file

    import perft_cli.modeling
    from perft_cli.errors import CheckpointError

    recipe = load_recipe(make_recipe(tmp_path, tiny_model_dir("olmoe"), train={"max_steps": 2}))
    run_train(recipe)
    ckpt = latest_checkpoint(Path(recipe.output_dir))
    weights = load_file(str(ckpt / ADAPTER_FILE))
    name = sorted(weights)[-1]
    weights[name] = torch.zeros(3, 3)
    save_file(weights, str(ckpt / ADAPTER_FILE))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(perft_cli.modeling, "load_model", refuse)
    with pytest.raises(CheckpointError, match=rf"adapter weight {name} has shape \(3, 3\), expected"):
        run_train(recipe, resume="auto")
