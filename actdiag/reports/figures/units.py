"""Dead and saturated units: the share of each ReLU-family or bounded layer's units that never move."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from actdiag.records import LayerStats
from actdiag.reports.figures._axes import _short
from actdiag.reports.figures._svg import ACT_COLOR, ERROR_COLOR, GRAD_COLOR, Rendered, _figure, _style, to_svg

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def unit_fractions(layers: Sequence[LayerStats], flagged: Sequence[str] = ()) -> Rendered | None:
    """Dead-unit fraction of ReLU-family layers and saturated fraction of bounded activations, by depth."""
    fig = draw_unit_fractions(layers, flagged)
    return None if fig is None else Rendered(to_svg(fig, "units"), title="dead and saturated fractions")


def draw_unit_fractions(layers: Sequence[LayerStats], flagged: Sequence[str] = ()) -> Figure | None:
    """The figure of `unit_fractions`: one slot per layer, its tick the layer's name, a bar per measured share
    side by side (never on top of one another), with the share written above it when there is room."""
    rows = [ly for ly in layers if ly.dead_fraction is not None or ly.saturation is not None]
    if not rows:
        return None
    n = len(rows)
    flagged_set = set(flagged)
    with _style():
        fig = _figure(min(13.0, max(6.0, 0.3 * n + 3)), 3.2)
        ax = fig.subplots()
        for i, ly in enumerate(rows):
            if ly.label in flagged_set:
                ax.axvspan(i - 0.5, i + 0.5, color=ERROR_COLOR, alpha=0.10, linewidth=0)
        both = [ly.dead_fraction is not None and ly.saturation is not None for ly in rows]
        for attr, name, color, side in (
            ("dead_fraction", "dead units (ReLU family)", ACT_COLOR, -1),
            ("saturation", "saturated outputs (bounded)", GRAD_COLOR, 1),
        ):
            idx = [i for i, ly in enumerate(rows) if getattr(ly, attr) is not None]
            if not idx:
                continue
            vals = np.array([getattr(rows[i], attr) for i in idx], dtype=np.float64)
            xs = np.array([i + (0.2 * side if both[i] else 0.0) for i in idx], dtype=np.float64)
            widths = np.array([0.36 if both[i] else 0.7 for i in idx])  # a gap between a slot's two bars
            bars = ax.bar(xs, vals, width=widths, color=color, alpha=0.9, label=name)
            for patch, i in zip(bars, idx):
                patch.set_gid(f"{attr}-{i}")
            if n <= 40:
                ax.bar_label(bars, labels=[f"{v:.0%}" for v in vals], fontsize=6, padding=1, color="#333333")
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylim(0, 1.12)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
        ax.set_ylabel("share")
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False, ncols=2)
        ax.grid(True, axis="y", alpha=0.3)
        step = 1 if n <= 40 else int(math.ceil(n / 30))
        ticks = list(range(0, n, step))
        ax.set_xticks(
            ticks,
            [_short(rows[t].label, 24) for t in ticks],
            rotation=45 if n > 8 or max(len(ly.label) for ly in rows) > 8 else 0,
            ha="right" if n > 8 or max(len(ly.label) for ly in rows) > 8 else "center",
            rotation_mode="anchor",
            fontsize=6 if n > 20 else 7,
        )
        for tick, t in zip(ax.get_xticklabels(), ticks):
            tick.set_color(ERROR_COLOR if rows[t].label in flagged_set else "black")
        ax.set_xlabel("layer (ReLU-family and bounded activations, forward order)")
        return fig
