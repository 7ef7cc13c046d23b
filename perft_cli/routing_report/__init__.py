"""Renderings of an inspect-routing report: rich terminal output, a self-contained HTML page, a PNG figure.

Presentation only: every number shown here is in the report dict (``--json``). Each rendering has its own module:
``terminal`` (``print_report``), ``html`` (``render_html``) and ``plot`` (``render_png``), all on the one colour
scale of ``style``; this package's entry point gathers them. ``counting`` computes the report's numbers (the routing
passes and per-layer statistics, torch), imported by the command only when it runs.
"""

from __future__ import annotations

from perft_cli.routing_report.html import render_html
from perft_cli.routing_report.plot import png_format, render_png, require_matplotlib
from perft_cli.routing_report.terminal import FULL_HISTOGRAMS, MAX_ALARM_HISTOGRAMS, MAX_ALARM_LINES, print_report

__all__ = [
    "FULL_HISTOGRAMS",
    "MAX_ALARM_HISTOGRAMS",
    "MAX_ALARM_LINES",
    "png_format",
    "print_report",
    "render_html",
    "render_png",
    "require_matplotlib",
]
