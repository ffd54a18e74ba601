"""The HTML report's figures: matplotlib (object API, Agg canvases) styled with seaborn, rendered to inline SVG.

Nothing here touches pyplot's global figure manager or the user's backend: figures are `matplotlib.figure.Figure`
objects drawn straight to a string, so making a report inside a notebook or a training script changes no state.
matplotlib and seaborn are imported on first use only, so `import actdiag` stays fast.

Text is kept as SVG `<text>` (`svg.fonttype: none`): the browser draws it with its own sans-serif font, which keeps
the file small and needs no font file. Layer names are user data; matplotlib escapes them in SVG text, and mathtext
parsing is off so a `$` in a name is shown, not interpreted.

Scale: a row per layer stops being readable long before 500 layers, so the histograms by depth are paginated and
capped (layers with findings first, the rest evenly spaced by depth), while the magnitude map shows every layer as one
row of one image.

Each figure has a `draw_*` function returning the matplotlib `Figure` (what the tests read: axes limits, tick labels,
artists) and a wrapper returning it as `Rendered` SVG. Artists a reader must find in the page (the marks of exact
zeros, the bars, the rows) carry a `gid`, which becomes the SVG element's id.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actdiag.formatting import format_number
from actdiag.metrics import GRAD_NORM, UPDATE_RATIO, WEIGHT_NORM
from actdiag.records import (
    E_LOW,
    FP16_MIN_NORMAL_EXP,
    FP16_MIN_SUBNORMAL_EXP,
    ExponentHistogram,
    Histogram,
    History,
    LayerStats,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RIDGE_ROWS_PER_PAGE = 36  # rows of the histograms-by-depth figure per page: still legible at the report's width
MAX_RIDGE_LAYERS = 72  # two pages; beyond this layers are selected, and the magnitude map shows them all
MAX_TIME_LAYERS = 12  # heatmaps over time / lines per chart
TIME_BINS = 48  # common value grid for a layer's distribution over time

ERROR_COLOR = "#c0392b"
ACT_COLOR = "#4c72b0"  # seaborn "deep" blue
GRAD_COLOR = "#dd8452"  # seaborn "deep" orange
OTHER_COLOR = "#55a868"  # seaborn "deep" green
RANGE_GAP = 20.0  # a layer this many times wider than all but a few others is left off the shared axis (see below)
ZERO_ROW = 0.04  # height, as a fraction of the axes, of the row where exact zeros are marked on a log axis


@dataclass(frozen=True, slots=True)
class Rendered:
    """One figure as inline SVG markup plus a caption-friendly note (e.g. which layers a page shows)."""

    svg: str
    title: str = ""
    note: str = ""


# ---------------------------------------------------------------------------------------------------- numerics
def rebin(edges: Sequence[float], counts: Sequence[float], new_edges: Sequence[float] | np.ndarray) -> np.ndarray:
    """Counts of a histogram moved onto other bin edges, assuming values spread uniformly within each source bin.

    Mass is conserved for the part of the source range that the new edges cover.
    """
    e = np.asarray(edges, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    ne = np.asarray(new_edges, dtype=np.float64)
    if len(e) != len(c) + 1 or len(ne) < 2:
        raise ValueError("edges must have one more entry than counts, and new_edges at least two")
    # Cumulative mass as a piecewise-linear function of x, evaluated at the new edges.
    cum = np.concatenate([[0.0], np.cumsum(c)])
    at = np.interp(ne, e, cum, left=0.0, right=cum[-1])
    return np.diff(at)


def exponent_matrix(
    hists: Sequence[ExponentHistogram | None],
) -> tuple[np.ndarray, int, int] | None:
    """Rows of fractions per power of two, trimmed to the exponents any row uses: (matrix, lowest, highest)."""
    lo, hi = None, None
    for h in hists:
        if h is None:
            continue
        rng = h.nonzero_range()
        if rng is None:
            continue
        lo = rng[0] if lo is None else min(lo, rng[0])
        hi = rng[1] if hi is None else max(hi, rng[1])
    if lo is None or hi is None:
        return None
    m = np.full((len(hists), hi - lo + 1), np.nan)
    for i, h in enumerate(hists):
        if h is None or h.total <= 0:
            continue
        row = np.asarray(h.counts[lo - E_LOW : hi - E_LOW + 1], dtype=np.float64)
        m[i] = row / h.total
    return m, lo, hi


def select_layers(labels: Sequence[str], flagged: Sequence[str], limit: int) -> list[int]:
    """Indices of at most `limit` layers in depth order: flagged ones first, the rest evenly spaced by depth."""
    n = len(labels)
    if n <= limit:
        return list(range(n))
    keep = [i for i, lb in enumerate(labels) if lb in set(flagged)][:limit]
    room = limit - len(keep)
    if room > 0:
        rest = [i for i in range(n) if i not in set(keep)]
        picks = np.linspace(0, len(rest) - 1, num=min(room, len(rest))).round().astype(int)
        keep.extend(rest[j] for j in dict.fromkeys(picks.tolist()))
    return sorted(keep)


def _log_or_nan(values: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


# ---------------------------------------------------------------------------------------------------- rendering
@contextmanager
def _style() -> Iterator[None]:
    import matplotlib
    import seaborn as sns

    rc: dict[str, Any] = {
        "svg.fonttype": "none",
        "text.parse_math": False,
        "font.family": "sans-serif",
        "font.size": 8,
        "axes.titlesize": 8,
        "axes.labelsize": 8,
        "xtick.labelsize": 7,
        "ytick.labelsize": 7,
        "legend.fontsize": 7,
        "figure.dpi": 100,
        "savefig.dpi": 100,
    }
    with sns.axes_style("ticks"), matplotlib.rc_context(rc):  # type: ignore[arg-type]
        yield


def _figure(width: float, height: float, constrained: bool = True) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained" if constrained else None)


_SVG_HEADER = re.compile(r"^.*?(?=<svg)", re.S)
_SVG_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
_SVG_SIZE = re.compile(r'\s(width|height)="[^"]*"')
# Geometry at 1/100 of a point is finer than any screen; matplotlib writes six decimals. Only these attributes are
# rounded: text content (layer names) is never touched.
_GEOMETRY = re.compile(r'(\s(?:d|points|x|y|transform)=")([^"]*)"')
# Each text element repeats the whole font list; the report's stylesheet sets it once for all figures instead.
_FONT_FAMILY = re.compile(r"\s*font-family:[^;\"]*;?")
# matplotlib numbers every group ("axes_1", "line2d_3", ...) afresh in each figure: nothing refers to these ids (clip
# paths and markers use hashed ones), and several figures in one page would repeat them. Ids set here as `gid` have
# no "_<number>" tail and stay.
_AUTO_ID = re.compile(r'\sid="[A-Za-z][\w.]*_\d+"')
_NO_ROTATE = re.compile(r'\stransform="rotate\(-?0 [^"]*\)"')
_DECIMALS = re.compile(r"(\d\.\d)\d+")
_SPACES = re.compile(r"\s*([MLCQZz])\s*|\s+")


def _compact_geometry(m: re.Match[str]) -> str:
    """One geometry attribute (path, position, rotation) at 0.1 pt, a seventh of a pixel at the report's width, with
    no line breaks: coordinates written to six decimals are most of a figure's bytes."""
    if "matrix" in m.group(2) or "scale" in m.group(2):
        return m.group(0)  # image placement: small factors, where one decimal would move pixels
    value = _DECIMALS.sub(r"\1", m.group(2))
    value = _SPACES.sub(lambda s: s.group(1) or " ", value).strip()
    if m.group(1).endswith('d="'):
        value = _axis_moves(value)
    return f'{m.group(1)}{value}"'


_PATH_TOKEN = re.compile(r"([MLz])([^MLz]*)")


def _axis_moves(d: str) -> str:
    """Rewrite the line-tos of a move/line-only path as horizontal/vertical moves where they are (step outlines
    are nothing else), dropping line-tos to the current point and merging consecutive moves that continue in the
    same direction (a spike, up then down, stays two moves). Paths with curves are returned unchanged."""
    tokens = _PATH_TOKEN.findall(d)
    if "".join(c + a for c, a in tokens) != d:
        return d
    out: list[str] = []
    cur: tuple[str, str] | None = None
    run: tuple[str, float] | None = None  # the axis of the H/V move at out[-1], and where that move started
    for cmd, args in tokens:
        xy = args.split()
        if cmd == "L" and cur is not None and len(xy) == 2:
            x, y = xy
            if (x, y) == cur:
                continue
            if x == cur[0] or y == cur[1]:
                axis, frm, to = ("V", cur[1], y) if x == cur[0] else ("H", cur[0], x)
                if run is not None and run[0] == axis and (float(to) - float(frm)) * (float(frm) - run[1]) > 0:
                    out[-1] = axis + to
                else:
                    out.append(axis + to)
                    run = (axis, float(frm))
            else:
                out.append(f"L{x} {y}")
                run = None
            cur = (x, y)
            continue
        out.append(cmd + args)
        run = None
        cur = (xy[0], xy[1]) if len(xy) == 2 else None
    return "".join(out)


def to_svg(fig: Figure, salt: str) -> str:
    """The figure as an `<svg>` element for inlining: no XML prolog, no fixed size (CSS scales it), and ids made
    unique per figure so several inline SVGs in one page never share a clip-path id."""
    import matplotlib

    buf = io.StringIO()
    # The style again at save time: svg.fonttype is read when the figure is written, not when it is drawn.
    with _style(), matplotlib.rc_context({"svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = _SVG_HEADER.sub("", buf.getvalue(), count=1)
    # The RDF metadata block only names namespaces by URL; without it the page holds no URL but xmlns.
    svg = _SVG_METADATA.sub("", svg, count=1)
    svg = _NO_ROTATE.sub("", svg)
    svg = _AUTO_ID.sub("", svg)
    svg = _GEOMETRY.sub(_compact_geometry, svg)
    svg = _FONT_FAMILY.sub("", svg)
    head, sep, rest = svg.partition(">")
    # Never wider than drawn (text stays at its design size), narrower on small screens.
    vb = re.search(r'viewBox="0 0 ([\d.]+) ', head)
    width_px = round(float(vb.group(1)) * 4 / 3) if vb else 1000
    head = _SVG_SIZE.sub("", head) + f' class="fig" role="img" style="max-width: {width_px}px"'
    return head + sep + rest


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


# ---------------------------------------------------------------------------------------------------- figures
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


def all_figures(layers: Sequence[LayerStats], history: History | None, flagged: Sequence[str]) -> dict[str, Any]:
    """Every figure the report shows, by section name; a section is absent (None/empty) when it does not apply."""
    labels = [ly.label for ly in layers]
    out: dict[str, Any] = {
        "depth": depth_histograms(layers, flagged),
        "flow": gradient_flow(layers, flagged),
        "units": unit_fractions(layers, flagged),
        "magnitudes": magnitude_map(layers),
        "time": None,
        "series": None,
        "weights": None,
    }
    if history is not None and len(history.steps) > 1:
        out["time"] = distribution_over_time(history, labels, flagged)
        out["series"] = series_over_time(history, labels, flagged)
        out["weights"] = weight_norms(history, flagged)
    return out
