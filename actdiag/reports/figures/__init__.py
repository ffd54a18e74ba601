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

The modules: `depth` (histograms by depth, magnitude map), `gradients` (gradient flow), `units` (dead and saturated
fractions), `history` (figures over training steps); beneath them `_svg` (style, figure, SVG output), `_axes` (log
axes, depth ticks) and `_numerics` (rebinning, exponent matrices, layer selection).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from actdiag.records import History, LayerStats
from actdiag.reports.figures._numerics import exponent_matrix, rebin, select_layers
from actdiag.reports.figures._svg import Rendered, to_svg
from actdiag.reports.figures.depth import (
    MAX_RIDGE_LAYERS,
    RANGE_GAP,
    RIDGE_ROWS_PER_PAGE,
    depth_histograms,
    draw_depth_histograms,
    draw_magnitude_map,
    histogram_quantiles,
    magnitude_map,
    shared_value_range,
)
from actdiag.reports.figures.gradients import ZERO_ROW, draw_gradient_flow, gradient_flow
from actdiag.reports.figures.history import (
    MAX_TIME_LAYERS,
    TIME_BINS,
    distribution_over_time,
    draw_distribution_over_time,
    draw_series_over_time,
    draw_weight_norms,
    series_over_time,
    weight_norms,
)
from actdiag.reports.figures.units import draw_unit_fractions, unit_fractions


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


__all__ = [
    "MAX_RIDGE_LAYERS",
    "MAX_TIME_LAYERS",
    "RANGE_GAP",
    "RIDGE_ROWS_PER_PAGE",
    "TIME_BINS",
    "ZERO_ROW",
    "Rendered",
    "all_figures",
    "depth_histograms",
    "distribution_over_time",
    "draw_depth_histograms",
    "draw_distribution_over_time",
    "draw_gradient_flow",
    "draw_magnitude_map",
    "draw_series_over_time",
    "draw_unit_fractions",
    "draw_weight_norms",
    "exponent_matrix",
    "gradient_flow",
    "histogram_quantiles",
    "magnitude_map",
    "rebin",
    "select_layers",
    "series_over_time",
    "shared_value_range",
    "to_svg",
    "unit_fractions",
    "weight_norms",
]
