"""Axes the figures share: log axes with plain-text tick labels, layer names as depth ticks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _short(label: str, width: int = 30) -> str:
    label = label or "(model)"
    return label if len(label) <= width else "\u2026" + label[-(width - 1) :]


_SUPERSCRIPT = str.maketrans("-0123456789", "\u207b\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079")


def _log_label(value: float, _pos: object = None) -> str:
    """A log-axis tick as plain text (10 with a superscript exponent): mathtext is off, see the module docstring."""
    if value <= 0 or not math.isfinite(value):
        return ""
    e = math.log10(value)
    if abs(e - round(e)) < 1e-9:
        return "1" if round(e) == 0 else "10" + str(int(round(e))).translate(_SUPERSCRIPT)
    return f"{value:.2g}"


def _log_axis(ax: Axes, which: str = "y", floor: float = 0.0) -> None:
    """A log axis with plain-text tick labels; ticks below `floor` stay unlabelled (the row of exact zeros)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def label(value: float, pos: object = None) -> str:
        return _log_label(value) if value >= floor else ""

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_formatter(FuncFormatter(label))
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    # Within two decades there may be one labelled power of ten or none, so 2x and 5x ticks carry numbers too.
    if lo > 0 and hi / lo < 100:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        axis.set_minor_formatter(FuncFormatter(label))
    else:
        axis.set_minor_formatter(NullFormatter())


def _depth_ticks(ax: Axes, labels: Sequence[str], axis: str = "x", depths: Sequence[int] | None = None) -> None:
    """Label the depth axis with layer names when they fit, else with a few depths (1-based positions in the
    forward order; `depths` gives them when the plotted layers are a subset)."""
    n = len(labels)
    depth = list(depths) if depths is not None else list(range(1, n + 1))
    if n <= 40:
        ticks = list(range(n))
        names = [_short(lb, 24) for lb in labels]
        if axis == "x":
            ax.set_xticks(ticks, names, rotation=45, ha="right", rotation_mode="anchor", fontsize=6 if n > 20 else 7)
        else:
            ax.set_yticks(ticks, names, fontsize=6 if n > 20 else 7)
    else:
        step = max(1, int(math.ceil(n / 12)))
        ticks = list(range(0, n, step))
        if axis == "x":
            ax.set_xticks(ticks, [str(depth[t]) for t in ticks])
            ax.set_xlabel("layer (position in forward order)")
        else:
            ax.set_yticks(ticks, [f"{depth[t]}. {_short(labels[t], 22)}" for t in ticks], fontsize=6)
