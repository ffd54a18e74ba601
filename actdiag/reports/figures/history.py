"""Figures over training steps: a layer's distribution over time, scalar series, weight norms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from actdiag.metrics import GRAD_NORM, UPDATE_RATIO, WEIGHT_NORM
from actdiag.records import Histogram, History
from actdiag.reports.figures._axes import _log_axis, _short
from actdiag.reports.figures._numerics import _log_or_nan, rebin, select_layers
from actdiag.reports.figures._svg import ERROR_COLOR, Rendered, _figure, _style, to_svg

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_TIME_LAYERS = 12  # heatmaps over time / lines per chart
TIME_BINS = 48  # common value grid for a layer's distribution over time


def _time_edges(hists: Sequence[Histogram | None]) -> np.ndarray | None:
    lo, hi = math.inf, -math.inf
    for h in hists:
        if h is not None and h.total > 0:
            lo, hi = min(lo, h.edges[0]), max(hi, h.edges[-1])
    if not math.isfinite(lo) or not math.isfinite(hi):
        return None
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, TIME_BINS + 1)


def distribution_over_time(history: History, labels: Sequence[str], flagged: Sequence[str] = ()) -> Rendered | None:
    """Each selected layer's activation distribution across recorded steps, re-binned onto one value grid per layer
    (the recorder's linear bins follow each step's own min and max) and drawn as a heatmap."""
    got = draw_distribution_over_time(history, labels, flagged)
    if got is None:
        return None
    fig, note = got
    return Rendered(to_svg(fig, "time"), title="activation distribution over time", note=note)


def draw_distribution_over_time(
    history: History, labels: Sequence[str], flagged: Sequence[str] = ()
) -> tuple[Figure, str] | None:
    """The figure of `distribution_over_time` and its note (how many layers it shows, when not all)."""
    steps = history.hist_steps
    if len(steps) < 2:
        return None
    present = [lb for lb in labels if lb in history.activation_histograms]
    chosen = [present[i] for i in select_layers(present, flagged, MAX_TIME_LAYERS)]
    if not chosen:
        return None
    import seaborn as sns

    cmap = sns.color_palette("mako_r", as_cmap=True)
    cols = min(3, len(chosen))
    rows = int(math.ceil(len(chosen) / cols))
    with _style():
        fig = _figure(3.6 * cols + 0.4, 2.2 * rows + 0.2)
        axes = fig.subplots(rows, cols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= len(chosen):
                ax.set_axis_off()
                continue
            label = chosen[k]
            hists = history.activation_histograms[label]
            edges = _time_edges(hists)
            ax.set_title(_short(label, 34), loc="left", color=ERROR_COLOR if label in flagged else "black")
            if edges is None:
                ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center")
                continue
            grid = np.full((TIME_BINS, len(steps)), np.nan)
            for j, h in enumerate(hists):
                if h is not None and h.total > 0:
                    grid[:, j] = rebin(h.edges, h.counts, edges) / h.total
            x_edges = _step_edges(steps)
            # rasterized: as vectors every cell would be its own SVG path (steps x bins of them per layer).
            ax.pcolormesh(x_edges, edges, np.sqrt(grid), cmap=cmap, vmin=0, vmax=1, shading="flat", rasterized=True)
            # Few ticks and labels on the outer panels only: tick text is most of this figure's SVG.
            ax.locator_params(axis="both", nbins=4)
            if k >= len(chosen) - cols:
                ax.set_xlabel("step")
            if k % cols == 0:
                ax.set_ylabel("activation")
        return fig, (f"{len(chosen)} of {len(present)} layers" if len(chosen) < len(present) else "")


def _step_edges(steps: Sequence[int]) -> np.ndarray:
    s = np.asarray(steps, dtype=np.float64)
    mids = (s[1:] + s[:-1]) / 2
    first = s[0] - (mids[0] - s[0])
    last = s[-1] + (s[-1] - mids[-1])
    return np.concatenate([[first], mids, [last]])


def series_over_time(history: History, labels: Sequence[str], flagged: Sequence[str] = ()) -> Rendered | None:
    """Update ratio and gradient norm per layer across recorded steps (log axes): the selected layers as lines, the
    spread over all layers (min to max) as a band behind them."""
    fig = draw_series_over_time(history, labels, flagged)
    return None if fig is None else Rendered(to_svg(fig, "series"), title="update ratios and gradient norms over time")


def draw_series_over_time(history: History, labels: Sequence[str], flagged: Sequence[str] = ()) -> Figure | None:
    """The figure of `series_over_time`. Layers whose value is exactly 0 at every recorded step (the gradient
    behind a dead layer) have no line on a log axis; they are named on the panel instead."""
    steps = np.asarray(history.steps, dtype=np.float64)
    if len(steps) < 2:
        return None
    panels = ((UPDATE_RATIO, "update ratio |\u0394W| / |W|"), (GRAD_NORM, "gradient norm"))
    present = [lb for lb in labels if lb in history.layers]
    if not present:
        return None
    with _style():
        fig = _figure(11.0, 3.4)
        axes = fig.subplots(1, 2)
        for ax, (metric, title) in zip(axes, panels):
            raw = {lb: np.asarray(history.layers[lb].get(metric, ()), dtype=np.float64) for lb in present}
            raw = {lb: v for lb, v in raw.items() if len(v) == len(steps) and np.isfinite(v).any()}
            always_zero = [lb for lb, v in raw.items() if (v[np.isfinite(v)] == 0).all()]
            series = {lb: _log_or_nan(v) for lb, v in raw.items() if lb not in always_zero}
            series = {lb: v for lb, v in series.items() if np.isfinite(v).any()}
            ax.set_title(title, loc="left")
            if always_zero:
                more = f" and {len(always_zero) - 6} more" if len(always_zero) > 6 else ""
                ax.text(
                    0.01,
                    0.02,
                    "exactly 0 at every step: " + ", ".join(_short(lb, 20) for lb in always_zero[:6]) + more,
                    transform=ax.transAxes,
                    fontsize=6,
                    color=ERROR_COLOR,
                    gid=f"zeros-{metric}",
                )
            if not series:
                if not always_zero:
                    ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="#777777")
                ax.set_yticks([])
                continue
            stack = np.vstack(list(series.values()))
            with np.errstate(all="ignore"):
                low, high = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
            if len(series) > 1:
                ax.fill_between(steps, low, high, color="#999999", alpha=0.2, linewidth=0, label="all layers")
            names = list(series)
            chosen = [names[i] for i in select_layers(names, flagged, 8)]
            import seaborn as sns

            colors = sns.color_palette("deep", len(chosen))
            for color, lb in zip(colors, chosen):
                ax.plot(steps, series[lb], linewidth=1.1, color=color, label=_short(lb, 24))
            _log_axis(ax)
            ax.set_xlabel("step")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(loc="best", frameon=False, fontsize=6, ncols=2)
        return fig


def weight_norms(history: History, flagged: Sequence[str] = ()) -> Rendered | None:
    """Each parameter's norm over training, absolute and relative to its first recorded step."""
    fig = draw_weight_norms(history, flagged)
    return None if fig is None else Rendered(to_svg(fig, "wnorm"), title="weight norms over training")


def draw_weight_norms(history: History, flagged: Sequence[str] = ()) -> Figure | None:
    """The figure of `weight_norms`: the norm of every parameter across recorded steps (log axis; the selected
    parameters as lines, the spread over all as a band) and the same divided by its first recorded value, where
    weight decay shows as a common downward drift and a runaway layer as a line leaving the band."""
    steps = np.asarray(history.steps, dtype=np.float64)
    if len(steps) < 2:
        return None
    series: dict[str, np.ndarray] = {}
    for name, metrics in history.params.items():
        v = _log_or_nan(metrics.get(WEIGHT_NORM, ()))
        if len(v) == len(steps) and np.isfinite(v).any():
            series[name] = v
    if not series:
        return None
    names = list(series)
    owners = set(flagged)
    # Lines for weights (the matrices weight decay acts on); biases and norms' scales stay in the band.
    lined = [nm for nm in names if not nm.endswith("bias")] or names
    hot = [nm for nm in lined if nm.rpartition(".")[0] in owners]
    chosen = [lined[i] for i in select_layers(lined, hot, 8)]
    relative = {nm: v / v[np.isfinite(v)][0] for nm, v in series.items()}
    import seaborn as sns

    colors = dict(zip(chosen, sns.color_palette("deep", len(chosen))))
    with _style():
        fig = _figure(11.0, 3.4)
        axes = fig.subplots(1, 2)
        for ax, data, title, key in (
            (axes[0], series, "weight norm \u2016W\u2016", "abs"),
            (axes[1], relative, "\u2016W\u2016 / \u2016W\u2016 at the first recorded step", "rel"),
        ):
            stack = np.vstack(list(data.values()))
            if len(data) > 1:
                with np.errstate(all="ignore"):
                    low, high = np.nanmin(stack, axis=0), np.nanmax(stack, axis=0)
                ax.fill_between(steps, low, high, color="#999999", alpha=0.2, linewidth=0, label="all parameters")
            for j, nm in enumerate(chosen):
                ax.plot(steps, data[nm], linewidth=1.1, color=colors[nm], label=_short(nm, 28), gid=f"wn-{key}-{j}")
            _log_axis(ax)
            ax.set_title(title, loc="left")
            ax.set_xlabel("step")
            ax.grid(True, axis="y", alpha=0.3)
            ax.legend(loc="best", frameon=False, fontsize=6, ncols=2)
        return fig
