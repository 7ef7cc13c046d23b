"""Renderings of an inspect-routing report: rich terminal output, a self-contained HTML page, a PNG figure.

Presentation only: every number shown here is in the report dict (``--json``). Each rendering has its own module:
``routing_terminal`` (``print_report``), ``routing_html`` (``render_html``) and ``routing_plot`` (``render_png``),
all on the one colour scale of ``routing_style``; this module is the entry point that gathers them.
"""

from __future__ import annotations

from perft_cli.routing_html import render_html
from perft_cli.routing_plot import png_format, render_png, require_matplotlib
from perft_cli.routing_terminal import FULL_HISTOGRAMS, MAX_ALARM_HISTOGRAMS, MAX_ALARM_LINES, print_report

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
