"""The HTML report's figures: matplotlib (object API, Agg canvases) styled with seaborn, rendered to inline SVG.

Nothing here touches pyplot's global figure manager or the user's backend: figures are `matplotlib.figure.Figure`
objects drawn straight to a string, so making a report inside a notebook or a training script changes no state.
matplotlib and seaborn are imported on first use only, so `import actdiag` stays fast.

Text is kept as SVG `<text>` (`svg.fonttype: none`): the browser draws it with its own sans-serif font, which keeps
the file small and needs no font file. Layer names are user data; matplotlib escapes them in SVG text, and mathtext
parsing is off so a `$` in a name is shown, not interpreted.

Scale: a panel per layer stops being readable long before 500 layers, so the per-layer grid is paginated and capped
(layers with findings first, the rest evenly spaced by depth), while the magnitude map shows every layer as one row
of one image.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from actdiag.formatting import format_number
from actdiag.metrics import GRAD_NORM, UPDATE_RATIO
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

PANELS_PER_PAGE = 36  # 6 x 6 panels: still legible at the report's width
GRID_COLUMNS = 6
MAX_GRID_PANELS = 72  # two pages; beyond this layers are selected, and the magnitude map shows them all
MAX_TIME_LAYERS = 12  # heatmaps over time / lines per chart
TIME_BINS = 48  # common value grid for a layer's distribution over time

ERROR_COLOR = "#c0392b"
ACT_COLOR = "#4c72b0"  # seaborn "deep" blue
GRAD_COLOR = "#dd8452"  # seaborn "deep" orange
OTHER_COLOR = "#55a868"  # seaborn "deep" green


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


def _log_or_nan(values: Sequence[float]) -> np.ndarray:
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
    are nothing else), dropping line-tos to the current point. Paths with curves are returned unchanged."""
    tokens = _PATH_TOKEN.findall(d)
    if "".join(c + a for c, a in tokens) != d:
        return d
    out: list[str] = []
    cur: tuple[str, str] | None = None
    for cmd, args in tokens:
        xy = args.split()
        if cmd == "L" and cur is not None and len(xy) == 2:
            x, y = xy
            if (x, y) == cur:
                continue
            if x == cur[0]:
                _push(out, "V", y)
            elif y == cur[1]:
                _push(out, "H", x)
            else:
                out.append(f"L{x} {y}")
            cur = (x, y)
            continue
        out.append(cmd + args)
        cur = (xy[0], xy[1]) if len(xy) == 2 else None
    return "".join(out)


def _push(out: list[str], axis: str, value: str) -> None:
    """Append an H/V move, merging it into a preceding move along the same axis."""
    if out and out[-1][0] == axis:
        out[-1] = axis + value
    else:
        out.append(axis + value)


def to_svg(fig: Figure, salt: str) -> str:
    """The figure as an `<svg>` element for inlining: no XML prolog, no fixed size (CSS scales it), and ids made
    unique per figure so several inline SVGs in one page never share a clip-path id."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = _SVG_HEADER.sub("", buf.getvalue(), count=1)
    # The RDF metadata block only names namespaces by URL; without it the page holds no URL but xmlns.
    svg = _SVG_METADATA.sub("", svg, count=1)
    svg = _NO_ROTATE.sub("", svg)
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


def _log_axis(ax: Axes, which: str = "y") -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis.set_major_formatter(FuncFormatter(_log_label))
    lo, hi = ax.get_ylim() if which == "y" else ax.get_xlim()
    # Within two decades there may be one labelled power of ten or none, so 2x and 5x ticks carry numbers too.
    if lo > 0 and hi / lo < 100:
        axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        axis.set_minor_formatter(FuncFormatter(_log_label))
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
def activation_grid(layers: Sequence[LayerStats], flagged: Sequence[str] = ()) -> list[Rendered]:
    """The classic figure: one activation histogram per layer in depth order, paginated and capped.

    A page is one axes holding a grid of cells rather than one axes per panel: 36 axes with their own ticks cost
    seconds of layout and hundreds of kilobytes of SVG, while a cell needs only its outline, its name and the value
    range at either end.
    """
    with_act = [ly for ly in layers if ly.activation is not None and ly.activation.count]
    if not with_act:
        return []
    labels = [ly.label for ly in with_act]
    chosen = select_layers(labels, flagged, MAX_GRID_PANELS)
    depth = {ly.label: i + 1 for i, ly in enumerate(layers)}
    flagged_set = set(flagged)
    pages: list[Rendered] = []
    for p0 in range(0, len(chosen), PANELS_PER_PAGE):
        page = [with_act[i] for i in chosen[p0 : p0 + PANELS_PER_PAGE]]
        cols = min(GRID_COLUMNS, len(page))
        rows = int(math.ceil(len(page) / cols))
        with _style():
            fig = _figure(1.85 * cols, 1.25 * rows, constrained=False)
            ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
            ax.set_xlim(0, cols)
            ax.set_ylim(0, rows)
            ax.set_axis_off()
            for k, ly in enumerate(page):
                x0, y0 = k % cols, rows - 1 - k // cols
                _histogram_cell(ax, ly, depth.get(ly.label, 0), x0, y0, ly.label in flagged_set)
            first, last = page[0].label, page[-1].label
            title = f"layers {depth[first]}\u2013{depth[last]}"
            pages.append(Rendered(to_svg(fig, f"grid{p0}"), title=title, note=f"{len(page)} panels"))
    return pages


def _histogram_cell(ax: Axes, ly: LayerStats, depth: int, x0: float, y0: float, flagged: bool) -> None:
    from matplotlib.patches import Rectangle

    a = ly.activation
    assert a is not None
    h: Histogram = a.histogram
    counts = np.asarray(h.counts, dtype=np.float64)
    edges = np.asarray(h.edges, dtype=np.float64)
    peak = counts.max() if counts.size and counts.max() > 0 else 1.0
    left, right, base, top = x0 + 0.05, x0 + 0.95, y0 + 0.2, y0 + 0.74
    color = ERROR_COLOR if flagged else ACT_COLOR
    ax.add_patch(
        Rectangle(
            (x0 + 0.02, y0 + 0.03),
            0.96,
            0.94,
            facecolor="#fdecea" if flagged else "#f6f7f9",
            edgecolor="none",
            clip_on=False,
        )
    )
    span = edges[-1] - edges[0]
    xs = left + (edges - edges[0]) / (span if span > 0 else 1.0) * (right - left)
    ys = base + counts / peak * (top - base)
    # A filled step outline: (x_i, base) (x_i, y_i) (x_i+1, y_i) ... (x_n, base).
    px = np.repeat(xs, 2)
    py = np.concatenate([[base], np.repeat(ys, 2), [base]])
    # clip_on=False: the cells lie inside the axes anyway, and an unclipped path needs no clip-path reference.
    ax.fill(px, py, color=color, alpha=0.85, linewidth=0, clip_on=False)
    ax.plot([left, right], [base, base], color="#888888", linewidth=0.6, clip_on=False)
    if edges[0] < 0 < edges[-1]:
        zx = left + (0 - edges[0]) / span * (right - left)
        ax.plot([zx, zx], [base - 0.04, base], color="#444444", linewidth=0.8, clip_on=False)
    ax.text(left, y0 + 0.92, _short(ly.label, 22), fontsize=7, va="top", color=color)
    ax.text(right, y0 + 0.92, f"#{depth}", fontsize=6, va="top", ha="right", color="#777777")
    ax.text(
        left,
        y0 + 0.8,
        f"{ly.type}  std {format_number(a.std)}  zero {a.zero_fraction:.0%}",
        fontsize=6,
        va="top",
        color="#555555",
    )
    ax.text(left, base - 0.03, format_number(edges[0]), fontsize=6, va="top", color="#555555")
    ax.text(right, base - 0.03, format_number(edges[-1]), fontsize=6, va="top", ha="right", color="#555555")


def gradient_flow(layers: Sequence[LayerStats], flagged: Sequence[str] = ()) -> Rendered | None:
    """Gradient norm and std against depth (log axis) beside activation std against depth."""
    if not layers:
        return None
    labels = [ly.label for ly in layers]
    x = np.arange(len(layers))
    gnorm = _log_or_nan([ly.gradient.norm if ly.gradient and ly.gradient.count else math.nan for ly in layers])
    gstd = _log_or_nan([ly.gradient.std if ly.gradient and ly.gradient.count else math.nan for ly in layers])
    astd = _log_or_nan([ly.activation.std if ly.activation and ly.activation.count else math.nan for ly in layers])
    n = len(layers)
    width = min(13.0, max(8.0, 0.16 * n + 4))
    with _style():
        fig = _figure(width, 3.4 if n <= 40 else 3.0)
        left, right = fig.subplots(1, 2)
        for ax, series, title in (
            (left, ((gnorm, "gradient norm", GRAD_COLOR), (gstd, "gradient std", OTHER_COLOR)), "gradient flow"),
            (right, ((astd, "activation std", ACT_COLOR),), "activation spread"),
        ):
            plotted = False
            for values, name, color in series:
                if np.isfinite(values).any():
                    marker = "o" if n <= 60 else None  # hundreds of markers only blur the line and bloat the SVG
                    ax.plot(x, values, marker=marker, markersize=2.5, linewidth=1.2, color=color, label=name)
                    plotted = True
            if plotted:
                _log_axis(ax)
                ax.legend(loc="best", frameon=False)
            else:
                ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="#777777")
            for i, lb in enumerate(labels):
                if lb in flagged:
                    ax.axvline(i, color=ERROR_COLOR, alpha=0.25, linewidth=3)
            ax.set_title(title, loc="left")
            ax.grid(True, which="major", axis="y", alpha=0.3)
            _depth_ticks(ax, labels)
        return Rendered(to_svg(fig, "flow"), title="gradient flow and activation spread")


def unit_fractions(layers: Sequence[LayerStats], flagged: Sequence[str] = ()) -> Rendered | None:
    """Dead-unit fraction of ReLU-family layers and saturated fraction of bounded activations, by depth."""
    rows = [(i, ly) for i, ly in enumerate(layers) if ly.dead_fraction is not None or ly.saturation is not None]
    if not rows:
        return None
    labels = [f"{i + 1}. {ly.label}" for i, ly in rows]
    dead = np.array([ly.dead_fraction if ly.dead_fraction is not None else np.nan for _, ly in rows])
    sat = np.array([ly.saturation if ly.saturation is not None else np.nan for _, ly in rows])
    n = len(rows)
    with _style():
        fig = _figure(min(13.0, max(6.0, 0.22 * n + 3)), 3.0)
        ax = fig.subplots()
        # Two step outlines instead of 2n bar patches: the same picture at a fraction of the SVG size.
        cells = np.arange(n + 1) - 0.5
        ax.stairs(np.nan_to_num(dead), cells, fill=True, color=ACT_COLOR, alpha=0.8, label="dead units (ReLU family)")
        ax.stairs(
            np.nan_to_num(sat), cells, fill=True, color=GRAD_COLOR, alpha=0.8, label="saturated outputs (bounded)"
        )
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction")
        ax.legend(loc="upper left", frameon=False, ncols=2)
        ax.grid(True, axis="y", alpha=0.3)
        _depth_ticks(ax, [ly.label for _, ly in rows] if n > 40 else labels, depths=[i + 1 for i, _ in rows])
        for i, (_, ly) in enumerate(rows):
            if ly.label in flagged:
                ax.axvspan(i - 0.5, i + 0.5, color=ERROR_COLOR, alpha=0.12, linewidth=0)
        return Rendered(to_svg(fig, "units"), title="dead and saturated fractions")


def magnitude_map(layers: Sequence[LayerStats]) -> Rendered | None:
    """Every layer as one row: the share of its activations (left) and gradients (right) at each power of two."""
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
        return Rendered(to_svg(fig, "magnitudes"), title="magnitudes of every layer")


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
        return Rendered(
            to_svg(fig, "time"),
            title="activation distribution over time",
            note=f"{len(chosen)} of {len(present)} layers" if len(chosen) < len(present) else "",
        )


def _step_edges(steps: Sequence[int]) -> np.ndarray:
    s = np.asarray(steps, dtype=np.float64)
    mids = (s[1:] + s[:-1]) / 2
    first = s[0] - (mids[0] - s[0])
    last = s[-1] + (s[-1] - mids[-1])
    return np.concatenate([[first], mids, [last]])


def series_over_time(history: History, labels: Sequence[str], flagged: Sequence[str] = ()) -> Rendered | None:
    """Update ratio and gradient norm per layer across recorded steps (log axes): the selected layers as lines, the
    spread over all layers (min to max) as a band behind them."""
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
            series: Mapping[str, np.ndarray] = {lb: _log_or_nan(history.layers[lb].get(metric, ())) for lb in present}
            series = {lb: v for lb, v in series.items() if len(v) == len(steps) and np.isfinite(v).any()}
            ax.set_title(title, loc="left")
            if not series:
                ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", color="#777777")
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
        return Rendered(to_svg(fig, "series"), title="update ratios and gradient norms over time")


def all_figures(layers: Sequence[LayerStats], history: History | None, flagged: Sequence[str]) -> dict[str, Any]:
    """Every figure the report shows, by section name; a section is absent (None/empty) when it does not apply."""
    labels = [ly.label for ly in layers]
    out: dict[str, Any] = {
        "grid": activation_grid(layers, flagged),
        "flow": gradient_flow(layers, flagged),
        "units": unit_fractions(layers, flagged),
        "magnitudes": magnitude_map(layers),
        "time": None,
        "series": None,
    }
    if history is not None and len(history.steps) > 1:
        out["time"] = distribution_over_time(history, labels, flagged)
        out["series"] = series_over_time(history, labels, flagged)
    return out
