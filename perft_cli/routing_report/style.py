"""The look shared by every rendering of an inspect-routing report: one colour scale and the before→after notation.

An expert's load share divided by the uniform share 1/E, on a log2 scale from 1/4x (blue) through 1x (white) to 4x
(red); dead experts (no tokens) are black.
"""

from __future__ import annotations

import math


def ratio_rgb(share: float, n: int) -> tuple[int, int, int]:
    """Diverging colour of a load share relative to uniform (1/n): blue < 1x (white) < red, black when dead."""
    if share <= 0:
        return (0, 0, 0)
    t = max(-1.0, min(1.0, math.log2(share * n) / 2))  # [-1, 1] for 1/4x .. 4x
    hot, cold, white = (178, 24, 43), (33, 102, 172), (247, 247, 247)
    end = hot if t > 0 else cold
    return tuple(round(w + abs(t) * (e - w)) for w, e in zip(white, end, strict=True))


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def arrow(a: float, b: float, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(a)}→{fmt.format(b)}"
