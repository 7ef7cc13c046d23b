"""One optimizer step: this process's micro-batches, the token-normalised loss, backward, clipping, the update.

Loss of one step = LM loss + c_base * base-router aux loss + c_perft * PERFT-router aux loss (method.md). The LM
loss is normalised by the real label tokens of the whole step (all micro-batches, all processes), as in Accelerate's
gradient-accumulation example, so accumulation and data parallelism do not change it; the aux losses are means over
micro-batches. The model is called without labels and the LM loss is computed here, so the three terms stay separate
for logging and for the token normalisation (the model would add its own aux loss into its loss).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from perft_cli import checkpoint as ck
from perft_cli.data import IGNORE_INDEX, collate, epoch_batches, rank_micro_batches
from perft_cli.errors import PerftError
from perft_cli.training.collapse import CollapseWatch
from perft_cli.training.setup import Run
from perft_cli.training.sharding import average_gradients, even_eval_batches
from perft_cli.training.state import Position


class TrainingError(PerftError):
    """Training cannot go on (non-finite loss); the last good checkpoint is kept."""


def next_micro_batches(run: Run, pos: Position) -> list[list[int]]:
    """This process's micro-batches (example indices) of the step at ``pos``."""
    t = run.recipe.train
    if pos.epoch_order is None or pos.epoch_order[0] != pos.epoch:
        lengths = run.train_set.lengths()
        batches = epoch_batches(lengths, t.batch_size, pos.data_seed, pos.epoch, run.recipe.data.group_by_length)
        pos.epoch_order = (pos.epoch, batches)
    a = run.accelerator
    return rank_micro_batches(pos.epoch_order[1][pos.batch], a.process_index, a.num_processes, t.micro_batch_size)


def label_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # labels are shifted by one for next-token loss


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in float32. logits [B, S, V], labels [B, S] (-100 = no loss)."""
    logits = logits[:, :-1, :].float()  # [B, S-1, V]
    target = labels[:, 1:].to(logits.device)  # [B, S-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def train_step(run: Run, micro: list[list[int]], watch: CollapseWatch, stop: dict) -> dict[str, Any]:
    """Forward and backward over this process's micro-batches; returns the step's statistics over all processes."""
    a = run.accelerator
    batches = [collate(run.train_set, idx, run.pad_id) for idx in micro]
    n_labels = reduce_sum(run, [sum(label_count(b) for b in batches)])[0]
    sums = torch.zeros(3, dtype=torch.float64)  # lm (already / n_labels), base aux, perft aux
    tokens = 0
    for batch in batches:
        batch = {k: v.to(run.device) for k, v in batch.items()}
        sums += forward_backward(run, batch, max(n_labels, 1))
        watch.add(run.attached.recorder.index, batch["attention_mask"])
        tokens += int(batch["attention_mask"].sum())
    if run.sharded:  # the adapters are FSDP-ignored, replicated: their gradients are averaged here (no DDP)
        average_gradients(run.params)
    count = len(batches) * a.num_processes
    lm, base, perft, tokens, stopped = reduce_sum(run, [*sums.tolist(), tokens, float(stop["stop"])])
    base, perft = base / count, perft / count
    loss = lm + (run.base_coef or 0.0) * base + (run.perft_coef or 0.0) * perft
    return {
        "loss": loss,
        "lm_loss": lm,
        "base_aux_loss": base if run.base_coef is not None else None,
        "perft_aux_loss": perft if run.perft_coef is not None else None,
        "tokens": int(tokens),
        "stop": stopped > 0,  # every process stops at the same step when any was interrupted
    }


def forward_backward(run: Run, batch: dict[str, torch.Tensor], n_labels: int) -> torch.Tensor:
    """One micro-batch. Returns (lm share of the step's loss, base aux, perft aux) as float64 [3]."""
    from perft_cli.perft import load_balancing_loss

    a, recorder = run.accelerator, run.attached.recorder
    with a.accumulate(run.model):
        kwargs = {"output_router_logits": True} if run.base_coef is not None else {}
        recorder.start()
        with a.autocast():
            output = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        recorder.stop()  # before backward: activation checkpointing's recomputation must not record again
        lm = token_nll_sum(output.logits, batch["labels"]) / n_labels
        zero = lm.new_zeros(())
        base = getattr(output, "aux_loss", None)
        base = zero if base is None or run.base_coef is None else base.to(lm.device).float()
        perft = zero
        if run.perft_coef is not None and recorder.logits:
            logits = [lg for _, lg in recorder.logits]
            index = [ix for _, ix in recorder.index]  # the top-K the adapters chose in this pass, recorded beside
            perft = load_balancing_loss(
                logits, run.attached.num_experts, run.attached.top_k, batch["attention_mask"], index=index
            )
            perft = perft.to(lm.device)
        # backward divides by the accumulation steps and DDP averages over processes; the LM term is already a
        # share of the whole step's token mean, so undo both for it.
        scale = a.gradient_accumulation_steps * a.num_processes
        total = lm * scale + (run.base_coef or 0.0) * base + (run.perft_coef or 0.0) * perft
        a.backward(total)
    return torch.tensor([lm.item(), base.item(), perft.item()], dtype=torch.float64)


def reduce_sum(run: Run, values: list[float]) -> list[float]:
    """Sum scalars over processes (one small all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        t = run.accelerator.reduce(t, reduction="sum")
    return t.tolist()


def clip_gradients(run: Run) -> float:
    """Clip to train.max_grad_norm (None: only measure); returns the norm before clipping."""
    max_norm = run.recipe.train.max_grad_norm or float("inf")
    return float(run.accelerator.clip_grad_norm_(run.params, max_norm))


def check_finite(run: Run, pos: Position, stats: dict[str, Any]) -> None:
    """Stop on a non-finite loss or gradient before the update, so the last checkpoint stays the last good state."""
    values = [stats["loss"]]
    if run.accelerator.mixed_precision != "fp16":  # fp16 loss scaling has inf gradients by design; it skips them
        values.append(stats["grad_norm"])
    if all(math.isfinite(v) for v in values):
        return
    last = ck.latest_checkpoint(run.run_dir)
    raise TrainingError(
        f"non-finite training loss at step {pos.step + 1} (loss {stats['loss']}, lm {stats['lm_loss']}, "
        f"grad norm {stats['grad_norm']}); stopped without saving it. Last good checkpoint: "
        f"{last if last else 'none'}. Lower train.lr (now {run.recipe.train.lr:g}) or check the data"
    )


def check_update(run: Run, pos: Position) -> None:
    """Stop when the update itself made an adapter weight non-finite (finite loss and gradients, an overflowing step):
    the run ends before this state is saved, so no checkpoint ever holds diverged weights. ``pos`` is after the step.
    One reduction and one host sync over the adapter (small next to a step)."""
    finite = torch.stack([p.detach().isfinite().all() for p in run.params]).all()
    if bool(finite):
        return
    bad = next(name for name, p in run.unwrapped.named_parameters() if p.requires_grad and not p.isfinite().all())
    last = ck.latest_checkpoint(run.run_dir)
    raise TrainingError(
        f"the update of step {pos.step} made adapter weights non-finite ({bad}); stopped without saving it. Last good "
        f"checkpoint: {last if last else 'none'}. Lower train.lr (now {run.recipe.train.lr:g}) or set "
        "train.max_grad_norm"
    )


def apply_update(run: Run) -> float:
    """AdamW step, schedule step, clear gradients; returns the learning rate the step used."""
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lr


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean next-token loss over the held-out split (LM loss only, no aux loss: method.md), split over processes."""
    a, model = run.accelerator, run.unwrapped
    model.eval()
    nll, count = 0.0, 0
    for idx in even_eval_batches(
        len(run.val_set), a.process_index, a.num_processes, run.recipe.train.micro_batch_size
    ):
        if not idx and not run.sharded:
            continue
        # Sharded, every rank runs as many forwards as the busiest one (each is a collective): padding counts nothing.
        batch = {k: v.to(run.device) for k, v in collate(run.val_set, idx or [0], run.pad_id).items()}
        with a.autocast():
            output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if idx:
            nll += float(token_nll_sum(output.logits, batch["labels"]))
            count += label_count(batch)
    model.train()
    total_nll, total_count = reduce_sum(run, [nll, count])
    return total_nll / max(total_count, 1)
