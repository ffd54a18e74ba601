"""Gradient flow: gradient norm and spread against depth, beside the activations' spread."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from actdiag.records import LayerStats
from actdiag.reports.figures._axes import _depth_ticks, _log_axis
from actdiag.reports.figures._numerics import _log_or_nan
from actdiag.reports.figures._svg import (
    ACT_COLOR,
    ERROR_COLOR,
    GRAD_COLOR,
    OTHER_COLOR,
    Rendered,
    _figure,
    _style,
    to_svg,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ZERO_ROW = 0.04  # height, as a fraction of the axes, of the row where exact zeros are marked on a log axis


def _zero_marks(ax: Axes, x: np.ndarray, raw: Sequence[float], color: str, name: str, slot: float, gid: str) -> bool:
    """Mark the layers whose value is exactly 0, which a log axis cannot show: a triangle on a row of its own at the
    axis floor, labelled "0" like a tick. Returns whether any was drawn."""
    a = np.asarray(raw, dtype=np.float64)
    zero = np.isfinite(a) & (a == 0)
    if not zero.any():
        return False
    from matplotlib.transforms import blended_transform_factory

    floor = blended_transform_factory(ax.transData, ax.transAxes)
    ax.plot(
        x[zero] + 0.12 * slot,
        np.full(int(zero.sum()), ZERO_ROW),
        transform=floor,
        linestyle="none",
        marker="v",
        markersize=5,
        color=color,
        clip_on=False,
        label=f"{name} = 0",
        gid=gid,
    )
    return True


def gradient_flow(layers: Sequence[LayerStats], flagged: Sequence[str] = ()) -> Rendered | None:
    """Gradient norm and std against depth (log axis) beside activation std against depth."""
    fig = draw_gradient_flow(layers, flagged)
    return None if fig is None else Rendered(to_svg(fig, "flow"), title="gradient flow and activation spread")


def draw_gradient_flow(layers: Sequence[LayerStats], flagged: Sequence[str] = ()) -> Figure | None:
    """The figure of `gradient_flow`. A value of exactly 0 (a gradient stopped by a dead layer, a constant output)
    has no place on a log axis; it gets a marker on a row of its own at the floor, labelled 0."""
    if not layers:
        return None
    labels = [ly.label for ly in layers]
    x = np.arange(len(layers), dtype=np.float64)
    nan = math.nan
    raw_gnorm = [ly.gradient.norm if ly.gradient and ly.gradient.count else nan for ly in layers]
    raw_gstd = [ly.gradient.std if ly.gradient and ly.gradient.count else nan for ly in layers]
    raw_astd = [ly.activation.std if ly.activation and ly.activation.count else nan for ly in layers]
    n = len(layers)
    width = min(13.0, max(8.0, 0.16 * n + 4))
    with _style():
        fig = _figure(width, 3.4 if n <= 40 else 3.0)
        left, right = fig.subplots(1, 2)
        for ax, series, title, key in (
            (
                left,
                ((raw_gnorm, "gradient norm", GRAD_COLOR), (raw_gstd, "gradient std", OTHER_COLOR)),
                "gradient flow",
                "grad",
            ),
            (right, ((raw_astd, "activation std", ACT_COLOR),), "activation spread", "act"),
        ):
            positive = [v for raw, _, _ in series for v in _log_or_nan(raw) if np.isfinite(v)]
            for values, name, color in series:
                logv = _log_or_nan(values)
                if np.isfinite(logv).any():
                    marker = "o" if n <= 60 else None  # hundreds of markers only blur the line and bloat the SVG
                    ax.plot(x, logv, marker=marker, markersize=2.5, linewidth=1.2, color=color, label=name)
            zeros = False
            for slot, (values, name, color) in enumerate(series):
                zeros |= _zero_marks(ax, x, values, color, name, slot - (len(series) - 1) / 2, f"zero-{key}-{slot}")
            if positive:
                lo, hi = min(positive), max(positive)
                span = max(hi / lo, 10.0)
                ax.set_yscale("log")
                # Room at the bottom for the row of zeros, clear of the lowest positive value, and no tick label
                # there to be read as the zeros' value.
                ax.set_ylim(lo / span**0.25 if zeros else lo / span**0.05, hi * span**0.08)
                _log_axis(ax, floor=lo / span**0.1 if zeros else 0.0)
            else:
                ax.set_yticks([])
                ax.text(
                    0.5,
                    0.5,
                    "every value is exactly 0" if zeros else "not recorded",
                    transform=ax.transAxes,
                    ha="center",
                    color="#777777",
                )
            if zeros:
                ax.text(-0.012, ZERO_ROW, "0", transform=ax.transAxes, ha="right", va="center", fontsize=7)
            if positive or zeros:
                ax.legend(loc="best", frameon=False, fontsize=6)
            for i, lb in enumerate(labels):
                if lb in flagged:
                    ax.axvline(i, color=ERROR_COLOR, alpha=0.25, linewidth=3)
            ax.set_title(title, loc="left")
            ax.grid(True, which="major", axis="y", alpha=0.3)
            _depth_ticks(ax, labels)
        return fig
