"""Rich renderings of results (presentation only: the same numbers are available as JSON)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from perft_cli.console import human_bytes, human_count, out


def print_plan(plan: dict[str, Any]) -> None:
    """Parameter accounting and memory estimate of ``perft plan``."""
    t = Table(title=f"perft plan: {plan['model']} ({plan['family']}, {plan['moe_layers']} MoE layers)")
    t.add_column("what")
    t.add_column("parameters", justify="right")
    t.add_column("exact", justify="right")
    rows = [
        (f"adapter trainable ({plan['variant']})", plan["trainable_params"]),
        ("adapter activated per token (routers incl.)", plan["activated_params"]),
        ("base model total (frozen)", plan["base_total_params"]),
        ("base model activated per token", plan["base_activated_params"]),
        ("total", plan["total_params"]),
    ]
    for label, n in rows:
        t.add_row(label, human_count(n), f"{n:,}")
    t.caption = f"trainable = {plan['trainable_percent']:.4f}% of the base"
    out.print(t)
    mem = plan["memory"]
    m = Table(title="training memory estimate (per process)")
    m.add_column("part")
    m.add_column("bytes", justify="right")
    for group, g in mem["groups"].items():
        m.add_row(f"weights: {group}", human_bytes(g["bytes"]))
    m.add_row("[bold]weights[/]", human_bytes(mem["weights_bytes"]))
    m.add_row("adapter gradients + AdamW state", human_bytes(mem["adapter_grad_optimizer_bytes"]))
    m.add_row("activations (rough)", human_bytes(mem["activation_bytes"]))
    m.add_row("[bold]total[/]", human_bytes(mem["total_bytes"]))
    a = mem["assumes"]
    m.caption = (
        f"{a['quantization']} weights (all-bf16 size {human_bytes(mem['weights_bf16_bytes'])}), micro-batch "
        f"{a['micro_batch_size']} x {a['seq_len']} tokens, activation checkpointing "
        f"{'on' if a['gradient_checkpointing'] else 'off'}"
    )
    out.print(m)
