"""benchmarks/step_floor.py at a tiny shape: every row and ratio it reports, and its experts-alone ceiling.

The numbers themselves are the benchmark's business (run it on a quiet machine); this keeps the script running
and its report's arithmetic true, in a few seconds.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # worker processes: three arms, each its own interpreter

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _kept() -> str:
    """What perft's allocator setting does in a worker here: kept on glibc unless the user chose otherwise."""
    from perft_cli.allocator import leave_reason

    reason = leave_reason()
    return "kept" if reason is None else f"left: {reason}"


@pytest.fixture(scope="module")
def module():
    """The script as a module named step_floor, as the spawned workers import it (benchmarks/ on sys.path)."""
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("step_floor", BENCH / "step_floor.py")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules["step_floor"] = loaded
    try:
        spec.loader.exec_module(loaded)
        yield loaded
    finally:
        sys.modules.pop("step_floor", None)
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def result(module):
    argv = ["--hidden", "64", "--intermediate", "32", "--experts", "8", "--top-k", "2", "--layers", "2"]
    return module, module.main([*argv, "--repeats", "1", "--experts-alone", "--experts-repeats", "2"])


def test_every_row_is_timed_in_every_arm(result):
    module, r = result
    assert r["arms"] == ["stock", "perft-experts", "perft"]  # the CPU's three: perft's experts path split out
    assert r["stacks"] == {  # as each worker reports its own model and malloc
        "stock": {"experts": "grouped_mm", "allocator": "glibc's default"},
        "perft-experts": {"experts": "perft_frozen", "allocator": "glibc's default"},
        "perft": {"experts": "perft_frozen", "allocator": _kept()},
    }
    assert set(r["rows"]) == set(module.ROWS)
    for name, times in r["rows"].items():
        assert set(times) == set(r["arms"]) and min(times.values()) > 0, name
        assert r["speedup"][name] == pytest.approx(times["stock"] / times["perft"])
        assert r["speedup_experts_path"][name] == pytest.approx(times["stock"] / times["perft-experts"])
    for path in r["arms"]:
        fwd = r["rows"]["frozen-forward"][path]
        assert r[path]["perft-r"]["over_forward"] == pytest.approx(r["rows"]["perft-r"][path] / fwd)
    pair = r["perft_e_vs_r_interleaved"]
    assert pair["ratio"] == pytest.approx(pair["seconds"]["perft-e"] / pair["seconds"]["perft-r-e-size"])
    assert r["perft_e_over_perft_r_e_size"]["perft"] == pytest.approx(
        r["rows"]["perft-e"]["perft"] / r["rows"]["perft-r-e-size"]["perft"]
    )


def test_experts_alone_splits_a_call_into_gemms_and_bookkeeping(result):
    _, r = result
    ea = r["experts_alone"]
    assert ea["tokens"] == 4 * 128 and ea["pairs"] == 2 * ea["tokens"]  # top-2: two pairs a token
    ms = ea["ms"]
    assert set(ms) == {f"{p} {k}" for p in ("stock", "perft") for k in ("forward", "forward+backward")} | {
        "grouped gemms forward",
        "grouped gemms backward",
        "grouped gemms",
        "dense gemm",
    }
    assert all(v > 0 for v in ms.values())
    assert ms["grouped gemms"] == pytest.approx(ms["grouped gemms forward"] + ms["grouped gemms backward"])
    for path in ("stock", "perft"):
        assert ms[f"{path} forward+backward"] > ms[f"{path} forward"]
        book = ea["bookkeeping_ms"][path]
        assert book["forward"] == pytest.approx(ms[f"{path} forward"] - ms["grouped gemms forward"])
        backward = ms[f"{path} forward+backward"] - ms[f"{path} forward"] - ms["grouped gemms backward"]
        assert book["backward"] == pytest.approx(backward)
    stock = ea["bookkeeping_ms"]["stock"]
    per_step = 2 * stock["forward"] + stock["backward"]  # two layers: both forwards, layer 1's backward
    assert ea["stock_bookkeeping_per_step_ms"] == pytest.approx(per_step)
    assert ea["of_perft_r_step"] == pytest.approx(per_step / (1e3 * r["rows"]["perft-r"]["stock"]))


def test_each_arm_runs_its_own_stack(module):
    """The workers really differ: the stock arm under glibc's defaults, the perft arm with freed memory kept."""
    import multiprocessing
    from types import SimpleNamespace

    arms = module.arms(module.torch.device("cpu"))
    assert arms == {
        "stock": ("grouped_mm", False),
        "perft-experts": ("perft_frozen", False),
        "perft": ("perft_frozen", True),
    }
    assert module.arms(module.torch.device("cuda")) == {
        "stock": ("grouped_mm", False),
        "perft": ("perft_frozen", False),
    }
    args = SimpleNamespace(
        hidden=64, intermediate=32, layers=1, experts=4, top_k=2, vocab=1024, batch=1, seq=8, threads=1, device="cpu"
    )
    ctx = multiprocessing.get_context("spawn")
    for arm, spec in arms.items():
        worker = module.Worker(ctx, arm, spec, args)
        try:
            assert worker.stack == {"experts": spec[0], "allocator": _kept() if spec[1] else "glibc's default"}
            assert worker.call("row", "frozen-forward") is None
            assert worker.call("run") > 0
            worker.call("end-row")
        finally:
            worker.stop()
        assert worker.process.exitcode == 0
