"""Figures by depth over one step: activation histograms by layer (a ridge plot on one shared value axis) and the
magnitude map of every layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from actdiag.formatting import format_number
from actdiag.records import FP16_MIN_NORMAL_EXP, FP16_MIN_SUBNORMAL_EXP, Histogram, LayerStats
from actdiag.reports.figures._axes import _depth_ticks, _short
from actdiag.reports.figures._numerics import exponent_matrix, select_layers
from actdiag.reports.figures._svg import ACT_COLOR, ERROR_COLOR, Rendered, _figure, _style, to_svg

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RIDGE_ROWS_PER_PAGE = 36  # rows of the histograms-by-depth figure per page: still legible at the report's width
MAX_RIDGE_LAYERS = 72  # two pages; beyond this layers are selected, and the magnitude map shows them all
RANGE_GAP = 20.0  # a layer this many times wider than all but a few others is left off the shared axis (see below)


def histogram_quantiles(h: Histogram, qs: Sequence[float]) -> np.ndarray:
    """Quantiles of a histogram's values, reading values as spread uniformly within each bin."""
    counts = np.asarray(h.counts, dtype=np.float64)
    edges = np.asarray(h.edges, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return np.full(len(qs), np.nan)
    cum = np.concatenate([[0.0], np.cumsum(counts)]) / total
    return np.interp(np.asarray(qs, dtype=np.float64), cum, edges)


def shared_value_range(hists: Sequence[Histogram]) -> tuple[float, float]:
    """One value axis for every layer: the union of each layer's central 99.8%, and 0, leaving out a few far-off
    layers.

    The union, not a pooled quantile: a layer whose values are wider than the rest must show as such, and in a
    collapse every layer's spread is a tenth of the one before, which is the picture. But a few layers standing apart
    from all others (a pre-activation shifted to -100, a logit layer) would squash every other row to a spike at 0:
    the largest reaches are left out when at most a fifth of the layers lie more than RANGE_GAP times beyond all the
    rest. Their rows are then marked with the share of their values beyond the axis, and the magnitude panel still
    places them.
    """
    lows, highs = [], []
    for h in hists:
        q = histogram_quantiles(h, (0.001, 0.999))
        if np.isfinite(q).all():
            lows.append(min(0.0, float(q[0])))
            highs.append(max(0.0, float(q[1])))
    if not lows:
        return -1.0, 1.0
    reach = np.maximum(-np.asarray(lows), np.asarray(highs))
    ranked = np.sort(reach)[::-1]
    cap = math.inf
    for k in range(1, len(ranked) // 5 + 1):
        if k < len(ranked) and ranked[k - 1] > RANGE_GAP * ranked[k] > 0:
            cap = float(ranked[k])  # the top k stand apart: the axis reaches the next layer
    lo, hi = max(min(lows), -cap), min(max(highs), cap)
    if hi - lo <= 0:
        return -1.0, 1.0
    pad = 0.03 * (hi - lo)
    return lo - pad, hi + pad


def depth_histograms(layers: Sequence[LayerStats], flagged: Sequence[str] = ()) -> list[Rendered]:
    """Activation histograms by depth, one row per layer, on ONE value axis (left) and one log2-magnitude axis
    (right): the figure of Glorot & Bengio (2010) and He et al. (2015), where a collapse toward 0 or a pile-up at
    +-1 is visible at a glance. Paginated and capped like every per-layer figure (flagged layers first)."""
    return [
        Rendered(to_svg(fig, f"ridge{k}"), title=title, note=note)
        for k, (fig, title, note) in enumerate(draw_depth_histograms(layers, flagged))
    ]


def draw_depth_histograms(layers: Sequence[LayerStats], flagged: Sequence[str] = ()) -> list[tuple[Figure, str, str]]:
    """The pages of `depth_histograms` as matplotlib figures, with their titles and notes."""
    with_act = [ly for ly in layers if ly.activation is not None and ly.activation.count]
    if not with_act:
        return []
    chosen = [with_act[i] for i in select_layers([ly.label for ly in with_act], flagged, MAX_RIDGE_LAYERS)]
    depth = {ly.label: i + 1 for i, ly in enumerate(layers)}
    stats = [ly.activation for ly in chosen]
    lo, hi = shared_value_range([s.histogram for s in stats if s is not None])
    exps = exponent_matrix([s.exponents if s is not None else None for s in stats])
    pages: list[tuple[Figure, str, str]] = []
    for p0 in range(0, len(chosen), RIDGE_ROWS_PER_PAGE):
        page = chosen[p0 : p0 + RIDGE_ROWS_PER_PAGE]
        rows_exp = None if exps is None else (exps[0][p0 : p0 + len(page)], exps[1], exps[2])
        fig = _ridge_page(page, (lo, hi), rows_exp, set(flagged), first=p0)
        first, last = page[0].label, page[-1].label
        title = f"layers {depth[first]}\u2013{depth[last]}"
        pages.append((fig, title, f"{len(page)} layers"))
    return pages


def _ridge_page(
    page: Sequence[LayerStats],
    xlim: tuple[float, float],
    exps: tuple[np.ndarray, int, int] | None,
    flagged: set[str],
    first: int = 0,
) -> Figure:
    """One page of rows; `first` is the index of its first row among all pages (element ids stay unique)."""
    n = len(page)
    with _style():
        fig = _figure(11.0, 0.24 * n + 1.0)
        left, right = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
        for k, ly in enumerate(page):
            a = ly.activation
            assert a is not None
            color = ERROR_COLOR if ly.label in flagged else ACT_COLOR
            if a.min == a.max:
                # A constant output (a dead ReLU's zeros): the recorder widens its bins around the value, which would
                # draw a block; the truth is a spike.
                _ridge_row(left, -k, (a.min, a.min), (1.0,), color, gid=f"row{first + k}")
            else:
                _ridge_row(left, -k, a.histogram.edges, a.histogram.counts, color, gid=f"row{first + k}")
            below, above = _shares_outside(a.histogram, xlim)
            for share, x_at, text, ha, side in (
                (below, xlim[0], f"\u25c2 {below:.1%} beyond", "left", "lo"),
                (above, xlim[1], f"{above:.1%} beyond \u25b8", "right", "hi"),
            ):
                if share >= 0.0005:
                    left.text(
                        x_at, -k + 0.35, text, ha=ha, fontsize=6, color="#555555", gid=f"beyond-{side}{first + k}"
                    )
            if exps is not None and np.isfinite(exps[0][k]).any():
                m, elo, ehi = exps
                e_edges = np.arange(elo - 1, ehi + 1, dtype=np.float64)  # bin e holds 2**(e-1) <= |x| < 2**e
                _ridge_row(right, -k, e_edges, np.nan_to_num(m[k]), color, gid=f"log{first + k}")
            right.text(
                1.01,
                -k + 0.3,
                f"std {format_number(a.std, 2)}  zero {a.zero_fraction:.0%}",
                transform=right.get_yaxis_transform(),
                fontsize=6,
                color="#555555",
                va="center",
            )
        left.set_xlim(*xlim)
        left.set_ylim(-n + 0.7, 1.1)
        left.set_yticks(
            [-k + 0.3 for k in range(n)], [_short(ly.label, 28) for ly in page], fontsize=7 if n <= 24 else 6
        )
        for tick, ly in zip(left.get_yticklabels(), page):
            tick.set_color(ERROR_COLOR if ly.label in flagged else "black")
        left.axvline(0.0, color="#444444", linewidth=0.6, linestyle=":")
        left.set_xlabel("activation value (one axis for every layer)")
        left.set_title("activation histograms by depth", loc="left")
        if exps is not None:
            elo, ehi = exps[1], exps[2]
            right.set_xlim(elo - 1.5, ehi + 0.5)
            # float16 limits: above 2**16 overflows, below 2**-14 is subnormal, below 2**-24 flushes to zero.
            for x, style in ((16, "-"), (FP16_MIN_NORMAL_EXP, ":"), (FP16_MIN_SUBNORMAL_EXP, "-")):
                if elo - 1.5 <= x <= ehi + 0.5:
                    right.axvline(x, color="#2a9d8f", linestyle=style, linewidth=1)
            right.set_xlabel("log2 |activation|  (teal: float16 limits)")
        else:
            right.text(0.5, 0.5, "not recorded", transform=right.transAxes, ha="center", color="#777777")
        right.set_title("magnitudes: share per power of two", loc="left")
        for ax in (left, right):
            ax.tick_params(axis="y", length=0)
            for side in ("left", "right", "top"):
                ax.spines[side].set_visible(False)
        return fig


def _ridge_row(
    ax: Axes,
    base: float,
    edges: Sequence[float] | np.ndarray,
    counts: Sequence[float] | np.ndarray,
    color: str,
    gid: str,
) -> None:
    """One histogram as a filled step outline on the row at `base`, scaled to its own peak (a shape, not an area:
    a collapsed layer is a tall spike, not an invisible sliver). The outline is drawn too, so a spike narrower
    than a pixel still shows as a line."""
    e = np.asarray(edges, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    peak = c.max() if c.size and c.max() > 0 else 1.0
    ys = base + c / peak * 0.9
    px = np.repeat(e, 2)
    py = np.concatenate([[base], np.repeat(ys, 2), [base]])
    from matplotlib.colors import to_rgba

    # One path, filled and outlined: a separate outline would repeat every vertex in the SVG.
    ax.fill(px, py, facecolor=to_rgba(color, 0.55), edgecolor=color, linewidth=0.7, gid=gid)
    ax.axhline(base, color="#cccccc", linewidth=0.4, zorder=0)


def _shares_outside(h: Histogram, xlim: tuple[float, float]) -> tuple[float, float]:
    """Shares of a histogram's values below and above the axis range."""
    counts = np.asarray(h.counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0, 0.0
    cum = np.concatenate([[0.0], np.cumsum(counts)]) / total
    at = np.interp(np.asarray(xlim, dtype=np.float64), np.asarray(h.edges, dtype=np.float64), cum, left=0.0, right=1.0)
    return float(at[0]), float(1.0 - at[1])


def magnitude_map(layers: Sequence[LayerStats]) -> Rendered | None:
    """Every layer as one row: the share of its activations (left) and gradients (right) at each power of two."""
    fig = draw_magnitude_map(layers)
    return None if fig is None else Rendered(to_svg(fig, "magnitudes"), title="magnitudes of every layer")


def draw_magnitude_map(layers: Sequence[LayerStats]) -> Figure | None:
    """The figure of `magnitude_map`; each panel's image holds the square root of the shares (rows: layers)."""
    if not layers:
        return None
    labels = [ly.label for ly in layers]
    act = exponent_matrix([ly.activation.exponents if ly.activation else None for ly in layers])
    grad = exponent_matrix([ly.gradient.exponents if ly.gradient else None for ly in layers])
    if act is None and grad is None:
        return None
    n = len(layers)
    import seaborn as sns

    cmap = sns.color_palette("rocket_r", as_cmap=True)
    with _style():
        fig = _figure(11.0, min(14.0, 1.6 + 0.14 * n))
        axes = fig.subplots(1, 2, sharey=True)
        for ax, got, title in ((axes[0], act, "activations"), (axes[1], grad, "gradients")):
            ax.set_title(f"{title}: share of values per power of two", loc="left")
            if got is None:
                ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="#777777")
                ax.set_xticks([])
                continue
            m, lo, hi = got
            im = ax.imshow(
                np.sqrt(np.nan_to_num(m)),
                aspect="auto",
                interpolation="nearest",
                cmap=cmap,
                vmin=0,
                vmax=1,
                extent=(lo - 0.5, hi + 0.5, n - 0.5, -0.5),
            )
            # float16 limits: values above 2**16 overflow, below 2**-24 flush to zero, below 2**-14 lose precision.
            for e, style in ((17, "-"), (FP16_MIN_NORMAL_EXP + 1, ":"), (FP16_MIN_SUBNORMAL_EXP + 1, "-")):
                if lo - 0.5 <= e - 0.5 <= hi + 0.5:
                    ax.axvline(e - 0.5, color="#2a9d8f", linestyle=style, linewidth=1)
            ax.set_xlabel("log2 |value|  (teal: float16 limits)")
            _depth_ticks(ax, labels, axis="y")
        cb = fig.colorbar(im, ax=axes, shrink=0.6, pad=0.01)
        cb.set_ticks([0, 0.1**0.5, 0.5**0.5, 1], labels=["0", "10%", "50%", "100%"])
        return fig
