"""The PNG rendering of an inspect-routing report: a matplotlib figure of heat maps and entropy per layer."""

from __future__ import annotations

from pathlib import Path

from perft_cli.errors import PerftError
from perft_cli.routing_report.style import hex_colour, ratio_rgb


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PerftError("--png needs matplotlib: pip install 'perft-cli[plot]'") from None


def png_format(path: Path) -> str:
    """The image format ``--png PATH`` asks for (its suffix; png without one), checked before any work is done."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = Path(path).suffix.removeprefix(".").lower() or "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise PerftError(
            f"--png {str(path)!r}: matplotlib cannot write .{fmt} files; end the name in .png "
            f"(or one of {', '.join('.' + k for k in sorted(supported))})"
        )
    return fmt


def render_png(report: dict, path: Path, fmt: str | None = None) -> None:
    """Heat maps before / after (and the PERFT router), one under the other, plus entropy per layer.

    ``fmt``: the image format (default: from the suffix of ``path``, png without one).
    """
    fmt = fmt or png_format(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.ticker import MaxNLocator

    colours = [hex_colour(ratio_rgb(s, 1)) for s in (0.25, 0.5, 1.0, 2.0, 4.0)]
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # experts are whole numbers (no 0.5 ticks)
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
    try:
        fig.savefig(path, dpi=110, format=fmt)
    finally:
        plt.close(fig)
