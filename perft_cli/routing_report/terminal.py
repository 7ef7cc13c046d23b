"""The terminal view of an inspect-routing report: heat-map grids, per-layer histograms, summary table, alarms.

The layer x expert heat-map grids and the summary table are always printed; per-layer histograms (bars per expert,
before | after) are printed for every layer when layers x experts <= 128 (a tiny model, or a few layers), otherwise
only for the layers with alarms (at most 3, worst first). The HTML page always has all of them. Histograms of up to
16 experts are one row per expert with the shares; wider ones are vertical bars, one character column per expert
(64 experts fit beside each other in 140 columns, else before is printed above after).
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from perft_cli import console
from perft_cli.console import human_count
from perft_cli.routing_report.style import arrow, ratio_rgb

FULL_HISTOGRAMS = 128  # layers x experts up to which every layer gets a histogram in the terminal
MAX_ALARM_HISTOGRAMS = 3
MAX_ALARM_LINES = 12
FILE_WIDTH = 200  # columns of the report when stdout is a file or a pipe


def _cells(shares: list[float]) -> list[Text]:
    """One coloured cell per expert, folded at 64 experts a line (256-expert models)."""
    n = len(shares)
    glyph = "██" if n <= 32 else "█"
    lines = []
    for start in range(0, n, 64):
        row = Text()
        for share in shares[start : start + 64]:
            row.append(
                glyph if share > 0 else "·" * len(glyph), style=f"rgb{ratio_rgb(share, n)}" if share > 0 else "grey50"
            )
        lines.append(row)
    return lines


def _grids(report: dict) -> list[Table]:
    """Layer x expert heat maps (before, after, PERFT router): side by side when they fit, else one below another."""
    keys = [("before", "before (detached)"), ("after", "after (attached)")]
    if report["perft_num_experts"]:
        keys.append(("perft", "PERFT router"))
    width = lambda key: len(_cells(report["layers"][0][key]["shares"])[0])  # noqa: E731
    groups = [keys] if 6 + sum(width(k) + 2 for k, _ in keys) <= _console().width else [[k] for k in keys]
    tables = []
    for group in groups:
        t = Table(box=None, pad_edge=False, padding=(0, 1), show_header=True, header_style="bold")
        t.add_column("layer", justify="right", style="dim")
        for _, title in group:
            t.add_column(title, no_wrap=True)
        for rep in report["layers"]:
            cols = [_cells(rep[key]["shares"]) for key, _ in group]
            for line in range(max(len(c) for c in cols)):
                label = f"L{rep['layer']}" if line == 0 else ""
                t.add_row(label, *[c[line] if line < len(c) else Text() for c in cols])
        tables.append(t)
    return tables


def _legend() -> Text:
    text = Text("load vs uniform: ")
    for label, share in (("1/4x", 0.25), ("1/2x", 0.5), ("1x", 1.0), ("2x", 2.0), ("4x", 4.0)):
        text.append("██", style=f"rgb{ratio_rgb(share, 1)}")
        text.append(f" {label}  ")
    text.append("·", style="grey50")
    text.append(" dead")
    return text


def _bar(share: float, scale: float, width: int = 18) -> str:
    eighths = round(share / scale * width * 8) if scale > 0 else 0
    full, part = divmod(eighths, 8)
    return "█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")


def _histogram(rep: dict) -> Table:
    """Up to 16 experts: one row per expert, horizontal bars before | after side by side, with the shares."""
    before, after = rep["before"]["shares"], rep["after"]["shares"]
    scale = max(max(before), max(after), 1e-12)
    t = Table(title=f"layer {rep['layer']} ({rep['name']}): base router load", title_justify="left")
    t.add_column("expert", justify="right")
    t.add_column("before (frozen)", no_wrap=True)
    t.add_column("", justify="right")
    t.add_column("after (fine-tuned)", no_wrap=True)
    t.add_column("", justify="right")
    n = len(before)
    for i in range(n):
        t.add_row(
            str(i),
            Text(_bar(before[i], scale), style="grey62"),
            f"{before[i]:.1%}",
            Text(_bar(after[i], scale), style=f"rgb{ratio_rgb(after[i], n)}" if after[i] > 0 else "grey50"),
            f"{after[i]:.1%}",
        )
    t.caption = f"uniform share {1 / n:.1%}; shift {rep['shift']:.3f}; moved: {rep['changed_tokens']:.1%} of tokens"
    return t


def _columns(shares: list[float], scale: float, colour: bool, height: int = 6) -> list[Text]:
    """Vertical bars, one character column per expert, ``height`` lines tall (1/8-line steps)."""
    n, levels = len(shares), " ▁▂▃▄▅▆▇█"
    lines = [Text() for _ in range(height)]
    for share in shares:
        eighths = round(share / scale * height * 8) if scale > 0 else 0
        style = (f"rgb{ratio_rgb(share, n)}" if colour else "grey62") if share > 0 else "grey50"
        for row in range(height):  # row 0 is the top line
            level = min(8, max(0, eighths - (height - 1 - row) * 8))
            glyph = "·" if share <= 0 and row == height - 1 else levels[level]
            lines[row].append(glyph, style=style)
    return lines


def _column_histogram(rep: dict) -> Table:
    """More than 16 experts: vertical bars per expert, before and after side by side when they fit, else stacked."""
    before, after = rep["before"]["shares"], rep["after"]["shares"]
    n, scale = len(before), max(max(before), max(after), 1e-12)
    axis = Text("".join(f"{i:<8d}" for i in range(0, n, 8))[:n], style="dim")
    panels = [
        ("before (frozen)", _columns(before, scale, False)),
        ("after (fine-tuned)", _columns(after, scale, True)),
    ]
    side = 2 * n + 12 <= _console().width
    t = Table(
        title=f"layer {rep['layer']} ({rep['name']}): base router load",
        title_justify="left",
        box=None,
        show_header=side,
        padding=(0, 1),
    )
    t.add_column("", justify="right", style="dim")
    for title, _ in panels if side else panels[:1]:
        t.add_column(title if side else "", no_wrap=True)
    for group in [panels] if side else [[p] for p in panels]:
        if not side:
            t.add_row("", Text(group[0][0], style="bold"))
        for row in range(len(group[0][1])):
            t.add_row(f"{scale:.0%}" if row == 0 else "", *[lines[row] for _, lines in group])
        t.add_row("expert", *[axis] * len(group))
    t.caption = f"uniform share {1 / n:.1%}; shift {rep['shift']:.3f}; moved: {rep['changed_tokens']:.1%} of tokens"
    return t


def _perft_histogram(rep: dict) -> Table:
    shares, cooc = rep["perft"]["shares"], rep["cooccurrence"]
    t = Table(title=f"layer {rep['layer']}: PERFT router load (top-{rep['perft']['top_k']})", title_justify="left")
    t.add_column("PEFT expert", justify="right")
    t.add_column("load", no_wrap=True)
    t.add_column("", justify="right")
    t.add_column("most often with base experts (share of its tokens)")
    scale = max(max(shares), 1e-12)
    for j, share in enumerate(shares):
        row, total = cooc[j], rep["perft"]["counts"][j]
        top = sorted(range(len(row)), key=lambda i: -row[i])[:3]
        partners = ", ".join(f"{i} ({row[i] / total:.0%})" for i in top if row[i]) if total else "-"
        t.add_row(str(j), _bar(share, scale), f"{share:.1%}", partners)
    return t


def _console() -> Console:
    """stdout's console in a terminal; elsewhere one wide enough that no table column is cut."""
    return console.out if console.out.is_terminal else Console(highlight=False, width=FILE_WIDTH)


def _summary(report: dict) -> Table:
    perft = report["perft_num_experts"] is not None
    t = Table(title="per-layer summary, before→after", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    heads = ["layer", "entropy", "CV", "max", "dead", "util q1/q2/q3", "shift", "moved"]
    heads += ["PERFT H", "P max", "P dead"] if perft else []
    for h in [*heads, "alarms"]:
        t.add_column(h, justify="right", no_wrap=True)
    for rep in report["layers"]:
        b, a = rep["before"]["stats"], rep["after"]["stats"]
        alarms = sum(1 for x in report["alarms"] if x["layer"] == rep["layer"])
        row = [
            str(rep["layer"]),
            arrow(b["entropy"], a["entropy"]),
            arrow(b["cv"], a["cv"]),
            f"{b['max_share']:.0%}→{a['max_share']:.0%}",
            f"{b['dead']}→{a['dead']}",
            f"{a['util_p25']:.2f}/{a['util_median']:.2f}/{a['util_p75']:.2f}",
            f"{rep['shift']:.2f}",
            f"{rep['changed_tokens']:.0%}",
        ]
        if perft:
            p = rep["perft"]["stats"]
            row += [f"{p['entropy']:.2f}", f"{p['max_share']:.0%}", str(p["dead"])]
        row.append(Text(str(alarms), style="bold red") if alarms else Text("0", style="green"))
        t.add_row(*row)
    t.caption = (
        "entropy: normalised, 1 = uniform; CV: std/mean of tokens per expert; max: largest share; dead: experts "
        "with no tokens; util: quartiles of each expert's load over a uniform one after fine-tuning (NeMo's "
        "utilisation; 1 = uniform); shift: total variation between the before/after load; moved: tokens whose "
        "base top-k changed"
    )
    t.caption_justify = "left"
    return t


def print_report(report: dict) -> None:
    """The terminal view: header, heat-map grids, histograms by the rule above, summary table, alarms.

    Written to a file or a pipe, the tables get a width of their own (rich would cut them to 80 columns).
    """
    out = _console()
    e, k, n_layers = report["base_num_experts"], report["top_k"], report["moe_layers"]
    head = (
        f"[bold]routing[/] through {escape(report['model'])} ({report['family']}, {n_layers} MoE layers, {e} experts, "
        f"top-{k}), adapter {report['variant']}"
    )
    if report["perft_num_experts"]:
        head += f" (N={report['perft_num_experts']}, K={report['perft_top_k']})"
    head += f"\n{human_count(report['tokens'])} tokens from {report['examples']} examples: {escape(report['data'])}"
    out.print(head)
    out.print("[bold]expert load per layer[/] (base router before / after fine-tuning)")
    for table in _grids(report):
        out.print(table)
    out.print(_legend())
    if n_layers * e <= FULL_HISTOGRAMS:
        shown = report["layers"]
    else:
        flagged = {a["layer"] for a in report["alarms"]}
        worst = sorted(
            (r for r in report["layers"] if r["layer"] in flagged), key=lambda r: -r["after"]["stats"]["max_share"]
        )
        shown = sorted(worst[:MAX_ALARM_HISTOGRAMS], key=lambda r: r["layer"])
        out.print(f"[dim]histograms: {len(shown)} of {n_layers} layers shown (layers with alarms); all in --html[/]")
    for rep in shown:
        out.print(_histogram(rep) if rep["num_experts"] <= 16 else _column_histogram(rep))
        if rep["perft"] is not None:
            out.print(_perft_histogram(rep))
    out.print(_summary(report))
    alarms = report["alarms"]
    if not alarms:
        out.print("[green]no alarms[/]: no collapsed or dead experts")
        return
    out.print(f"[bold red]{len(alarms)} alarm(s)[/]")
    for a in alarms[:MAX_ALARM_LINES]:
        out.print(f"  [{'red' if a['kind'] == 'collapse' else 'yellow'}]{a['kind']}[/] {escape(a['message'])}")
    if len(alarms) > MAX_ALARM_LINES:
        out.print(f"  ... and {len(alarms) - MAX_ALARM_LINES} more (see --json)")
