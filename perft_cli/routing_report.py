"""Renderings of an inspect-routing report: rich terminal output, a self-contained HTML page, a PNG figure.

Presentation only: every number shown here is in the report dict (``--json``). One colour scale everywhere: an
expert's load share divided by the uniform share 1/E, on a log2 scale from 1/4x (blue) through 1x (white) to 4x
(red); dead experts (no tokens) are black.

Terminal rule: the layer x expert heat-map grids and the summary table are always printed; per-layer histograms
(bars per expert, before | after) are printed for every layer when layers x experts <= 128 (a tiny model, or a few
layers), otherwise only for the layers with alarms (at most 3, worst first). The HTML page always has all of them.
Histograms of up to 16 experts are one row per expert with the shares; wider ones are vertical bars, one character
column per expert (64 experts fit beside each other in 140 columns, else before is printed above after).
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from perft_cli.console import human_count, out
from perft_cli.errors import PerftError

FULL_HISTOGRAMS = 128  # layers x experts up to which every layer gets a histogram in the terminal
MAX_ALARM_HISTOGRAMS = 3
MAX_ALARM_LINES = 12


def _ratio_rgb(share: float, n: int) -> tuple[int, int, int]:
    """Diverging colour of a load share relative to uniform (1/n): blue < 1x (white) < red, black when dead."""
    if share <= 0:
        return (0, 0, 0)
    t = max(-1.0, min(1.0, math.log2(share * n) / 2))  # [-1, 1] for 1/4x .. 4x
    hot, cold, white = (178, 24, 43), (33, 102, 172), (247, 247, 247)
    end = hot if t > 0 else cold
    return tuple(round(w + abs(t) * (e - w)) for w, e in zip(white, end, strict=True))


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _arrow(a: float, b: float, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(a)}→{fmt.format(b)}"


# ----------------------------------------------------------------------------------------------------------- terminal
def _cells(shares: list[float]) -> list[Text]:
    """One coloured cell per expert, folded at 64 experts a line (256-expert models)."""
    n = len(shares)
    glyph = "██" if n <= 32 else "█"
    lines = []
    for start in range(0, n, 64):
        row = Text()
        for share in shares[start : start + 64]:
            row.append(
                glyph if share > 0 else "·" * len(glyph), style=f"rgb{_ratio_rgb(share, n)}" if share > 0 else "grey50"
            )
        lines.append(row)
    return lines


def _grids(report: dict) -> list[Table]:
    """Layer x expert heat maps (before, after, PERFT router): side by side when they fit, else one below another."""
    keys = [("before", "before (detached)"), ("after", "after (attached)")]
    if report["perft_num_experts"]:
        keys.append(("perft", "PERFT router"))
    width = lambda key: len(_cells(report["layers"][0][key]["shares"])[0])  # noqa: E731
    groups = [keys] if 6 + sum(width(k) + 2 for k, _ in keys) <= out.width else [[k] for k in keys]
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
        text.append("██", style=f"rgb{_ratio_rgb(share, 1)}")
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
            Text(_bar(after[i], scale), style=f"rgb{_ratio_rgb(after[i], n)}" if after[i] > 0 else "grey50"),
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
        style = (f"rgb{_ratio_rgb(share, n)}" if colour else "grey62") if share > 0 else "grey50"
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
    side = 2 * n + 12 <= out.width
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


def _summary(report: dict) -> Table:
    perft = report["perft_num_experts"] is not None
    t = Table(title="per-layer summary, before→after", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    heads = ["layer", "entropy", "CV", "max", "dead", "shift", "moved"]
    heads += ["PERFT H", "P max", "P dead"] if perft else []
    for h in [*heads, "alarms"]:
        t.add_column(h, justify="right", no_wrap=True)
    for rep in report["layers"]:
        b, a = rep["before"]["stats"], rep["after"]["stats"]
        alarms = sum(1 for x in report["alarms"] if x["layer"] == rep["layer"])
        row = [
            str(rep["layer"]),
            _arrow(b["entropy"], a["entropy"]),
            _arrow(b["cv"], a["cv"]),
            f"{b['max_share']:.0%}→{a['max_share']:.0%}",
            f"{b['dead']}→{a['dead']}",
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
        "with no tokens; shift: total variation between the before/after load; moved: tokens whose top-k changed"
    )
    t.caption_justify = "left"
    return t


def print_report(report: dict) -> None:
    """The terminal view: header, heat-map grids, histograms by the rule above, summary table, alarms."""
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


# --------------------------------------------------------------------------------------------------------------- HTML
def _svg_heatmap(rows: list[tuple[str, list[float]]], title: str, tips: list[list[str]], uniform: int) -> str:
    """A grid of coloured cells (one row per label), each cell with a tooltip."""
    n = max(len(v) for _, v in rows)
    cw = max(6, min(22, 900 // max(n, 1)))
    ch, left, top = 16, 44, 22
    width, height = max(left + n * cw + 4, 7 * len(title)), top + len(rows) * ch + 18
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(f'<text x="0" y="14" class="t">{html.escape(title)}</text>')
    for r, (label, values) in enumerate(rows):
        y = top + r * ch
        parts.append(f'<text x="{left - 6}" y="{y + 12}" class="l" text-anchor="end">{html.escape(label)}</text>')
        for c, v in enumerate(values):
            fill = _hex(_ratio_rgb(v, uniform))
            parts.append(
                f'<rect x="{left + c * cw}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="{fill}">'
                f"<title>{html.escape(tips[r][c])}</title></rect>"
            )
    step = max(1, n // 16)
    for c in range(0, n, step):
        x = left + c * cw + cw / 2
        parts.append(f'<text x="{x}" y="{top + len(rows) * ch + 12}" class="l" text-anchor="middle">{c}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_bars(series: list[tuple[str, list[float], str]], title: str) -> str:
    """Grouped bars per expert (one colour per series) with the uniform share as a dashed line."""
    n = len(series[0][1])
    group = max(8, min(40, 960 // n))
    bw = max(2, (group - 2) // len(series))
    left, top, h = 44, 22, 140
    scale = max(max(max(v) for _, v, _ in series), 1e-12)
    width, height = max(left + n * group + 8, 7 * len(title)), top + h + 34
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(f'<text x="0" y="14" class="t">{html.escape(title)}</text>')
    parts.append(f'<line x1="{left}" y1="{top + h}" x2="{width}" y2="{top + h}" stroke="#888"/>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" class="l" text-anchor="end">{scale:.0%}</text>')
    for s, (name, values, colour) in enumerate(series):
        for i, v in enumerate(values):
            bh = v / scale * h
            x = left + i * group + s * bw
            parts.append(
                f'<rect x="{x}" y="{top + h - bh:.1f}" width="{bw - 1}" height="{bh:.1f}" fill="{colour}">'
                f"<title>{html.escape(name)} e{i}: {v:.1%}</title></rect>"
            )
    uy = top + h - (1 / n) / scale * h
    parts.append(f'<line x1="{left}" y1="{uy:.1f}" x2="{width}" y2="{uy:.1f}" stroke="#444" stroke-dasharray="4 3"/>')
    for i in range(0, n, max(1, n // 32)):
        x = left + i * group + group / 2
        parts.append(f'<text x="{x}" y="{top + h + 12}" class="l" text-anchor="middle">{i}</text>')
    lx = left
    for name, _, colour in series:
        parts.append(f'<rect x="{lx}" y="{top + h + 20}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14}" y="{top + h + 29}" class="l">{html.escape(name)}</text>')
        lx += 14 + 7 * len(name) + 16
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px} h2{font-size:16px;margin-top:28px} .t{font:bold 12px sans-serif} .l{font:10px sans-serif}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4} .alarm{color:#b2182b;font-weight:bold} li{color:#b2182b} .ok{color:#1a7f37}
.meta td{text-align:left}
.layer{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start;border-top:1px solid #eee;padding-top:8px}
.legend span{display:inline-block;width:18px;height:12px;margin:0 4px 0 10px;vertical-align:middle}
"""


def render_html(report: dict) -> str:
    """A self-contained page: inline CSS and SVG, no scripts, nothing fetched from the network."""
    e = report["base_num_experts"]
    esc = html.escape
    body = [f"<h1>Routing: {esc(report['model'])} ({esc(report['family'])}), adapter {esc(report['variant'])}</h1>"]
    meta = [
        ("checkpoint", report["checkpoint"]),
        ("data", report["data"]),
        ("tokens", f"{report['tokens']:,} from {report['examples']} examples (cut to {report['cutoff_len']})"),
        ("base router", f"{e} experts, top-{report['top_k']}, {report['moe_layers']} MoE layers"),
    ]
    if report["perft_num_experts"]:
        meta.append(("PERFT router", f"N={report['perft_num_experts']}, K={report['perft_top_k']}"))
    body.append('<table class="meta">' + "".join(f"<tr><th>{k}</th><td>{esc(str(v))}</td></tr>" for k, v in meta))
    body.append("</table>")
    legend = "".join(
        f'<span style="background:{_hex(_ratio_rgb(s, 1))}"></span>{lab}'
        for lab, s in (("1/4x", 0.25), ("1/2x", 0.5), ("1x uniform", 1.0), ("2x", 2.0), ("4x", 4.0), ("dead", 0))
    )
    body.append(f'<p class="legend">load share vs uniform: {legend}</p>')
    alarms = report["alarms"]
    if alarms:  # a <details> element: folded when long, so the charts stay near the top (no script needed)
        items = "".join(f"<li>{esc(a['kind'])}: {esc(a['message'])}</li>" for a in alarms)
        opened = " open" if len(alarms) <= 5 else ""
        body.append(
            f'<details{opened}><summary class="alarm">{len(alarms)} alarm(s)</summary><ul>{items}</ul></details>'
        )
    else:
        body.append('<p class="ok">No alarms: no collapsed or dead experts.</p>')
    body.append("<h2>Heat maps: layer x expert</h2>")
    for key, title in (("before", "base router, before (adapters detached)"), ("after", "base router, after")):
        rows = [(f"L{r['layer']}", r[key]["shares"]) for r in report["layers"]]
        tips = [
            [f"L{r['layer']} e{i}: {c} tok, {s:.1%}" for i, (c, s) in enumerate(_cs(r[key]))] for r in report["layers"]
        ]
        body.append(_svg_heatmap(rows, title, tips, e))
    if report["perft_num_experts"]:
        rows = [(f"L{r['layer']}", r["perft"]["shares"]) for r in report["layers"]]
        tips = [
            [f"L{r['layer']} P{i}: {c} tok, {s:.1%}" for i, (c, s) in enumerate(_cs(r["perft"]))]
            for r in report["layers"]
        ]
        body.append(_svg_heatmap(rows, "PERFT router", tips, report["perft_num_experts"]))
    body.append("<h2>Summary</h2>" + _html_summary(report))
    body.append("<h2>Per layer</h2>")
    for r in report["layers"]:
        parts = [
            _svg_bars(
                [("before", r["before"]["shares"], "#9e9e9e"), ("after", r["after"]["shares"], "#5e3c99")],
                f"layer {r['layer']}: base router load (shift {r['shift']:.3f}, moved {r['changed_tokens']:.1%})",
            )
        ]
        if r["perft"] is not None:
            parts.append(_svg_bars([("PERFT", r["perft"]["shares"], "#1b7837")], f"layer {r['layer']}: PERFT router"))
            parts.append(_cooc_svg(r))
        body.append(f'<div class="layer" id="layer-{r["layer"]}">{"".join(parts)}</div>')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>perft inspect-routing: {esc(report['model'])}</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def _cs(load: dict) -> list[tuple[int, float]]:
    return list(zip(load["counts"], load["shares"], strict=True))


def _cooc_svg(r: dict) -> str:
    """Co-occurrence as lift: P(base i | PEFT j) / P(base i); 1 (white) = the two routings are independent."""
    cooc, pcounts, base = r["cooccurrence"], r["perft"]["counts"], r["after"]["shares"]
    k, e = r["top_k"], r["num_experts"]
    rows, tips = [], []
    for j, row in enumerate(cooc):
        cond = [c / (pcounts[j] * k) if pcounts[j] else 0.0 for c in row]  # P(base i | PEFT j), sums to 1
        rows.append((f"P{j}", [c / b / e if b else 0.0 for c, b in zip(cond, base, strict=True)]))
        tips.append(
            [f"P{j} e{i}: {c} tok, lift {v * e:.2f}" for i, (c, v) in enumerate(zip(row, rows[-1][1], strict=True))]
        )
    return _svg_heatmap(
        rows, f"layer {r['layer']}: PEFT x base expert co-occurrence (lift; black: never together)", tips, e
    )


def _html_summary(report: dict) -> str:
    perft = report["perft_num_experts"] is not None
    head = ["layer", "entropy", "CV", "max share", "dead", "shift", "moved"]
    head += ["PERFT entropy", "PERFT max", "PERFT dead"] if perft else []
    rows = []
    for r in report["layers"]:
        b, a = r["before"]["stats"], r["after"]["stats"]
        cells = [
            str(r["layer"]),
            _arrow(b["entropy"], a["entropy"]),
            _arrow(b["cv"], a["cv"]),
            _arrow(b["max_share"], a["max_share"], "{:.1%}"),
            f"{b['dead']}→{a['dead']}",
            f"{r['shift']:.3f}",
            f"{r['changed_tokens']:.1%}",
        ]
        if perft:
            p = r["perft"]["stats"]
            cells += [f"{p['entropy']:.3f}", f"{p['max_share']:.1%}", str(p["dead"])]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


# ---------------------------------------------------------------------------------------------------------------- PNG
def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PerftError("--png needs matplotlib: pip install 'perft-cli[plot]'") from None


def render_png(report: dict, path: Path) -> None:
    """Heat maps before / after (and the PERFT router), one under the other, plus entropy per layer."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    colours = [_hex(_ratio_rgb(s, 1)) for s in (0.25, 0.5, 1.0, 2.0, 4.0)]
    cmap = LinearSegmentedColormap.from_list("ratio", colours).with_extremes(bad="black")
    layers = [r["layer"] for r in report["layers"]]
    panels = [("before", "base router, before (adapters detached)"), ("after", "base router, after (attached)")]
    if report["perft_num_experts"]:
        panels.append(("perft", "PERFT router"))
    row_h = 0.6 + 0.22 * len(layers)
    fig, axes = plt.subplots(
        len(panels) + 1,
        1,
        figsize=(11, row_h * len(panels) + 2.6),
        layout="constrained",
        height_ratios=[row_h] * len(panels) + [2.2],
    )
    for ax, (key, title) in zip(axes, panels, strict=False):
        shares = np.array([r[key]["shares"] for r in report["layers"]])  # [L, E]
        with np.errstate(divide="ignore"):
            ratio = np.log2(shares * shares.shape[1])  # log2(share / uniform); -inf where dead
        ratio = np.ma.masked_invalid(np.where(shares > 0, np.clip(ratio, -2, 2), np.nan))
        im = ax.imshow(ratio, cmap=cmap, vmin=-2, vmax=2, aspect="auto", interpolation="nearest")
        ax.set(title=title, ylabel="MoE layer", yticks=range(len(layers)), yticklabels=layers)
    axes[len(panels) - 1].set_xlabel("expert")
    fig.colorbar(im, ax=axes[: len(panels)], label="log2(share / uniform), black: dead", shrink=0.9)
    ax = axes[-1]
    for key, style in (("before", "o--"), ("after", "o-"), ("perft", "s-")):
        if key != "perft" or report["perft_num_experts"]:
            ax.plot(layers, [r[key]["stats"]["entropy"] for r in report["layers"]], style, label=key)
    ax.set(title="normalised routing entropy (1 = uniform)", xlabel="MoE layer", ylim=(0, 1.05), xticks=layers)
    ax.legend(loc="lower left")
    fig.suptitle(f"{report['model']} ({report['variant']}): routing of {report['tokens']:,} tokens", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
