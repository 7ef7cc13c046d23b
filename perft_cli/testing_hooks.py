"""Every test hook of the product code, in one place: environment variables that the test suite sets to make a run
stop hard or dump its state at a chosen point. For every user they are unset, and each hook does nothing.

- ``PERFT_TEST_KILL_AT_STEP=N``: SIGKILL the process right after the checkpoint of step N is written, as a crash
  would (the kill -9 resume tests). With ``PERFT_TEST_KILL_RANK=R`` only the process of global rank R does.
- ``PERFT_TEST_DUMP_ADAPTER=DIR``: at the end of training, every process writes its adapter weights to
  ``DIR/rank<r>.safetensors`` (the data-parallel tests compare the ranks).
- ``PERFT_TEST_SIGINT_AT=final-eval|summary``: the process sends itself SIGINT (a Ctrl-C) at that point after the
  last step, at the very moment a user's would land there.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

KILL_ENV = "PERFT_TEST_KILL_AT_STEP"
KILL_RANK_ENV = "PERFT_TEST_KILL_RANK"
DUMP_ENV = "PERFT_TEST_DUMP_ADAPTER"
SIGINT_ENV = "PERFT_TEST_SIGINT_AT"


def kill_after_save(step: int) -> None:
    """SIGKILL this process if the tests asked for a hard kill after the checkpoint of ``step``."""
    rank = os.environ.get("RANK", "0")
    if os.environ.get(KILL_ENV) == str(step) and os.environ.get(KILL_RANK_ENV, rank) == rank:
        os.kill(os.getpid(), signal.SIGKILL)


def sigint_at(stage: str) -> None:
    """A Ctrl-C now, if the tests asked for one at ``stage``."""
    if os.environ.get(SIGINT_ENV) == stage:
        os.kill(os.getpid(), signal.SIGINT)


def dump_adapter(state: dict[str, torch.Tensor], rank: int) -> None:
    """Write this process's final adapter weights where the tests asked (nothing when they did not)."""
    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return
    from safetensors.torch import save_file

    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(folder) / f"rank{rank}.safetensors"))
