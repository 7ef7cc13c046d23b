"""The HTML rendering of an inspect-routing report: one self-contained page of inline SVG heat maps, bars, tables."""

from __future__ import annotations

import html

from perft_cli.routing_report.style import arrow, hex_colour, ratio_rgb


def _svg_heatmap(rows: list[tuple[str, list[float]]], title: str, tips: list[list[str]], uniform: int) -> str:
    """A grid of coloured cells (one row per label), each cell with a tooltip."""
    n = max(len(v) for _, v in rows)
    cw = max(10, min(34, 1150 // max(n, 1)))  # cells a reader can hover and see: 10-34 px wide, 24 px high
    ch, left, top = 24, 52, 24
    width, height = max(left + n * cw + 4, 7 * len(title)), top + len(rows) * ch + 18
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(f'<text x="0" y="14" class="t">{html.escape(title)}</text>')
    for r, (label, values) in enumerate(rows):
        y = top + r * ch
        parts.append(f'<text x="{left - 6}" y="{y + 12}" class="l" text-anchor="end">{html.escape(label)}</text>')
        for c, v in enumerate(values):
            fill = hex_colour(ratio_rgb(v, uniform))
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
        f'<span style="background:{hex_colour(ratio_rgb(s, 1))}"></span>{lab}'
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
    head = ["layer", "entropy", "CV", "max share", "dead", "utilisation q1 / median / q3", "shift", "moved"]
    head += ["PERFT entropy", "PERFT max", "PERFT dead"] if perft else []
    rows = []
    for r in report["layers"]:
        b, a = r["before"]["stats"], r["after"]["stats"]
        cells = [
            str(r["layer"]),
            arrow(b["entropy"], a["entropy"]),
            arrow(b["cv"], a["cv"]),
            arrow(b["max_share"], a["max_share"], "{:.1%}"),
            f"{b['dead']}→{a['dead']}",
            " / ".join(arrow(b[q], a[q]) for q in ("util_p25", "util_median", "util_p75")),
            f"{r['shift']:.3f}",
            f"{r['changed_tokens']:.1%}",
        ]
        if perft:
            p = r["perft"]["stats"]
            cells += [f"{p['entropy']:.3f}", f"{p['max_share']:.1%}", str(p["dead"])]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"
