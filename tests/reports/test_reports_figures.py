"""The figure helpers' numerics (re-binning histograms onto a common grid, exponent matrices, layer selection, the SVG
post-processing that keeps the report small without changing what is drawn) and every figure of the HTML report,
read back from its matplotlib objects on a model with a saturated, a dead and zero-gradient layers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import actdiag
from actdiag.records import E_LOW, ExponentHistogram, Histogram, History, Report
from actdiag.reports.figures import (
    RIDGE_ROWS_PER_PAGE,
    ZERO_ROW,
    distribution_over_time,
    draw_depth_histograms,
    draw_distribution_over_time,
    draw_gradient_flow,
    draw_magnitude_map,
    draw_series_over_time,
    draw_unit_fractions,
    draw_weight_norms,
    exponent_matrix,
    histogram_quantiles,
    rebin,
    select_layers,
    shared_value_range,
)
from actdiag.reports.figures._axes import _log_label
from actdiag.reports.figures._svg import _axis_moves

from .conftest import PathologyNet, pathology_run

counts_st = st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(counts=counts_st, lo=st.floats(-100, 100), width=st.floats(1e-3, 100), n_new=st.integers(1, 50))
def test_reports_figures_rebin_conserves_mass(counts: list[int], lo: float, width: float, n_new: int) -> None:
    edges = np.linspace(lo, lo + width, len(counts) + 1)
    # New grid covering the old range (and more): all mass lands somewhere, none is invented.
    new = np.linspace(lo - width * 0.3, lo + width * 1.2, n_new + 1)
    out = rebin(edges, counts, new)
    assert out.shape == (n_new,)
    assert (out >= -1e-9).all()
    assert out.sum() == pytest.approx(sum(counts), rel=1e-9, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 1000), min_size=2, max_size=40).filter(lambda c: len(c) % 2 == 0))
def test_reports_figures_rebin_aligned_coarsening_is_exact(counts: list[int]) -> None:
    edges = np.linspace(-3.0, 5.0, len(counts) + 1)
    out = rebin(edges, counts, edges[::2])
    ref = np.asarray(counts, dtype=np.float64).reshape(-1, 2).sum(axis=1)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(rebin(edges, counts, edges), counts, rtol=1e-12, atol=1e-9)


def test_reports_figures_rebin_matches_numpy_on_uniform_data() -> None:
    """Uniform data: moving a fine histogram onto an unaligned grid agrees with numpy binning the raw values."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 3.0, size=400_000)
    fine_edges = np.linspace(-1.0, 3.0, 65)
    fine, _ = np.histogram(x, bins=fine_edges)
    new_edges = np.linspace(-0.77, 2.61, 17)
    ref, _ = np.histogram(x, bins=new_edges)
    out = rebin(fine_edges, fine, new_edges)
    np.testing.assert_allclose(out, ref, rtol=0.03)


def test_reports_figures_rebin_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        rebin([0.0, 1.0], [1.0, 2.0], [0.0, 1.0])


def test_reports_figures_exponent_matrix_trims_and_normalises() -> None:
    a = [0.0] * 255
    a[3 - E_LOW] = 2.0  # values in [4, 8)
    a[-2 - E_LOW] = 6.0  # values in [1/8, 1/4)
    b = [0.0] * 255
    b[0 - E_LOW] = 5.0
    got = exponent_matrix([ExponentHistogram(tuple(a)), None, ExponentHistogram(tuple(b))])
    assert got is not None
    m, lo, hi = got
    assert (lo, hi) == (-2, 3)
    np.testing.assert_allclose(m[0], [0.75, 0, 0, 0, 0, 0.25])
    assert np.isnan(m[1]).all()
    np.testing.assert_allclose(m[2], [0, 0, 1.0, 0, 0, 0])
    assert exponent_matrix([None, ExponentHistogram((0.0,) * 255)]) is None


def test_reports_figures_select_layers() -> None:
    labels = [f"l{i}" for i in range(100)]
    picked = select_layers(labels, ["l57", "l3"], 10)
    assert len(picked) == 10 and picked == sorted(picked)
    assert 57 in picked and 3 in picked and 0 in picked and 99 in picked
    assert select_layers(labels[:5], [], 10) == [0, 1, 2, 3, 4]


def test_reports_figures_axis_moves_and_log_labels() -> None:
    assert _axis_moves("M1 2L1 5L3 5L3 5L4 5L7 9z") == "M1 2V5H4L7 9z"
    # A spike (up, then down along the same axis) keeps both moves: merging them would erase it.
    assert _axis_moves("M0 0L0 5L0 5L0 0") == "M0 0V5V0"
    assert _axis_moves("M0 0L0 5L0 7L0 1L2 1L1 1") == "M0 0V7V1H2H1"
    curved = "M0 0C1 1 2 2 3 3L3 4"
    assert _axis_moves(curved) == curved
    assert _log_label(1e-3) == "10\u207b\u00b3" and _log_label(1.0) == "1" and _log_label(100.0) == "10\u00b2"
    assert _log_label(0.05) == "0.05" and _log_label(0.0) == "" and _log_label(math.inf) == ""


def test_reports_figures_distribution_over_time_needs_steps() -> None:
    h = Histogram(edges=(0.0, 1.0, 2.0), counts=(3.0, 1.0))
    one = History(hist_steps=(0,), activation_histograms={"a": (h,)})
    assert distribution_over_time(one, ["a"]) is None
    moving = Histogram(edges=(5.0, 6.0, 7.0), counts=(0.0, 4.0))
    two = History(hist_steps=(0, 10), activation_histograms={"a": (h, moving)})
    fig = distribution_over_time(two, ["a"])
    assert fig is not None and fig.svg.startswith("<svg") and "a" in fig.svg


# ------------------------------------------------------------------------------------------------ the figures
@pytest.fixture(scope="module")
def pathology() -> tuple[PathologyNet, Report]:
    return pathology_run()


def _by_gid(ax, gid: str):  # type: ignore[no-untyped-def]
    found = [a for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, gid
    return found[0]


def test_reports_figures_pathology_model_is_what_it_claims(pathology: tuple[PathologyNet, Report]) -> None:
    """The figures below are checked on a model with each pathology: assert they are really there."""
    _, report = pathology
    by = {ly.label: ly for ly in report.layers}
    assert by["act0"].saturation is not None and by["act0"].saturation > 0.5
    assert by["act1"].dead_fraction == 1.0
    for name in ("fc0", "act0", "fc1"):
        g = by[name].gradient
        assert g is not None and g.count > 0 and g.norm == 0.0, name
    assert by["head"].gradient is not None and by["head"].gradient.norm > 0


def test_reports_figures_depth_histograms_share_one_axis(pathology: tuple[PathologyNet, Report]) -> None:
    _, report = pathology
    layers = report.layers
    pages = draw_depth_histograms(layers, flagged=["act1"])
    assert len(pages) == 1
    fig, title, _ = pages[0]
    assert title == f"layers 1\u2013{len(layers)}"
    left, right = fig.axes  # two axes for every layer: no per-layer axes with their own range
    names = [t.get_text() for t in left.get_yticklabels()]
    assert names == [ly.label for ly in layers]
    assert [t.get_color() for t in left.get_yticklabels()].count("#c0392b") == 1  # the flagged layer is red
    lo, hi = left.get_xlim()
    # The saturated tanh (values at -1 and +1) fits on the axis, and each row is drawn in the axis's own units:
    # its outline's x coordinates are the layer's histogram edges, not a panel of its own scaled to fit.
    assert lo < -1.0 and hi > 1.0
    for k, ly in enumerate(layers):
        assert ly.activation is not None
        xs = _by_gid(left, f"row{k}").get_xy()[:, 0]
        if ly.activation.min == ly.activation.max:
            np.testing.assert_array_equal(xs, ly.activation.min)  # a constant output is a spike at its value
        else:
            np.testing.assert_allclose(np.unique(xs), np.unique(ly.activation.histogram.edges))
    tanh = next(k for k, ly in enumerate(layers) if ly.label == "act0")
    row = _by_gid(left, f"row{tanh}").get_xy()
    heights = row[:, 1] + tanh  # rows sit at y = -k
    assert heights[np.abs(row[:, 0]) > 0.9].max() == pytest.approx(0.9)  # its peak is at the bounds
    # fc1 is centred near -100 and fc0 spreads to +-40: not a few layers apart from the rest, so the axis holds them
    # all and no row is marked as reaching beyond it.
    assert lo < -100.0 and hi > 30.0
    assert not [a for a in left.texts if (a.get_gid() or "").startswith("beyond")]
    # The log2 panel: one row per layer with non-zero values (the dead layer's are all exactly 0).
    logs = {a.get_gid() for a in right.get_children() if (a.get_gid() or "").startswith("log")}
    assert logs == {f"log{k}" for k, ly in enumerate(layers) if ly.label != "act1"}


def test_reports_figures_depth_histogram_pages_share_the_axis() -> None:
    """Pages of a deep model: one value range and one magnitude range for all of them."""
    width = 4
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(30)])
    with torch.no_grad():
        model[-1][0].weight.mul_(40.0)  # the last block saturates: a wider range than every other layer
    report = actdiag.inspect(model, torch.randn(16, width))
    pages = draw_depth_histograms(report.layers)
    assert len(pages) == 2 and len(pages[0][0].axes[0].get_yticklabels()) == RIDGE_ROWS_PER_PAGE
    assert pages[0][0].axes[0].get_xlim() == pages[1][0].axes[0].get_xlim()
    assert pages[0][0].axes[1].get_xlim() == pages[1][0].axes[1].get_xlim()


def test_reports_figures_shared_value_range() -> None:
    edges = np.linspace(-1.0, 1.0, 11)
    unit = Histogram(edges, [10.0] * 10)
    q = histogram_quantiles(unit, (0.0, 0.5, 0.75, 1.0))
    np.testing.assert_allclose(q, [-1.0, 0.0, 0.5, 1.0])
    narrow = Histogram(edges * 1e-3, [10.0] * 10)
    lo, hi = shared_value_range([unit, narrow])
    assert lo < -0.99 and hi > 0.99  # the union: the narrow layer does not shrink the axis
    # A collapse (each layer a tenth of the one before) keeps every layer on the axis.
    collapse = [Histogram(edges * 10.0**-k, [10.0] * 10) for k in range(8)]
    lo, hi = shared_value_range(collapse)
    assert lo < -0.99 and hi > 0.99
    # One layer far off (at 1000) among five near 1: left off the axis, which reaches the others.
    far = Histogram(edges + 1000.0, [10.0] * 10)
    lo, hi = shared_value_range([unit, narrow, unit, unit, narrow, far])
    assert 0.99 < hi < 1.1 and -1.1 < lo < -0.99
    # ... but not when it is not a few: two of five are more than a fifth.
    lo, hi = shared_value_range([unit, narrow, unit, far, far])
    assert hi > 1000.0
    positive = Histogram(np.linspace(2.0, 3.0, 5), [1.0] * 4)
    lo, hi = shared_value_range([positive])
    assert lo < 0.0 < 2.0 < hi  # 0 is always on the axis


def test_reports_figures_gradient_flow_marks_exact_zeros(pathology: tuple[PathologyNet, Report]) -> None:
    _, report = pathology
    layers = report.layers
    fig = draw_gradient_flow(layers)
    assert fig is not None
    grad_ax, act_ax = fig.axes
    zero_norm = [i for i, ly in enumerate(layers) if ly.gradient is not None and ly.gradient.norm == 0.0]
    assert zero_norm == [0, 1, 2]
    marks = _by_gid(grad_ax, "zero-grad-0")
    assert np.rint(marks.get_xdata()).astype(int).tolist() == zero_norm
    np.testing.assert_array_equal(marks.get_ydata(), ZERO_ROW)  # on the floor row, in axes coordinates
    assert marks.get_marker() == "v" and marks.get_label() == "gradient norm = 0"
    assert "gradient norm = 0" in [t.get_text() for t in grad_ax.get_legend().get_texts()]
    assert any(t.get_text() == "0" for t in grad_ax.texts)  # the floor row is labelled like a tick
    # The floor is below every positive value, and no log tick label sits on the row of zeros.
    positive = [ly.gradient.std for ly in layers if ly.gradient is not None and ly.gradient.std > 0]
    assert grad_ax.get_yscale() == "log" and grad_ax.get_ylim()[0] < min(positive)
    bottom, top = np.log10(grad_ax.get_ylim())
    for locs, formatter in (
        (grad_ax.yaxis.get_majorticklocs(), grad_ax.yaxis.get_major_formatter()),
        (grad_ax.yaxis.get_minorticklocs(), grad_ax.yaxis.get_minor_formatter()),
    ):
        near_floor = [v for v in locs if 0 <= (np.log10(v) - bottom) / (top - bottom) < 0.1]
        assert [formatter(v) for v in near_floor] == [""] * len(near_floor)
    labelled = [v for v in grad_ax.yaxis.get_majorticklocs() if grad_ax.yaxis.get_major_formatter()(v)]
    assert labelled  # the rest of the axis keeps its labels
    # The dead layer's output is constant: its std (exactly 0) is marked on the activation panel.
    act_marks = _by_gid(act_ax, "zero-act-0")
    dead = [i for i, ly in enumerate(layers) if ly.activation is not None and ly.activation.std == 0.0]
    assert np.rint(act_marks.get_xdata()).astype(int).tolist() == dead and dead
    # Lines carry only the positive values (a log axis cannot hold the zeros).
    line = next(ln for ln in grad_ax.get_lines() if ln.get_label() == "gradient norm")
    assert np.isnan(line.get_ydata()[zero_norm]).all() and np.isfinite(line.get_ydata()[3:]).all()


def test_reports_figures_gradient_flow_all_zero_and_no_zero() -> None:
    """Every gradient exactly 0: no log axis to draw, the marks and a sentence instead. A healthy model: no mark."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    report = actdiag.inspect(model, torch.randn(8, 4), loss_fn=lambda out, inp: out.sum() * 0.0)
    fig = draw_gradient_flow(report.layers)
    assert fig is not None
    ax = fig.axes[0]
    assert len(_by_gid(ax, "zero-grad-0").get_xdata()) == 3
    assert "every value is exactly 0" in [t.get_text() for t in ax.texts]
    healthy = draw_gradient_flow(actdiag.inspect(model, torch.randn(8, 4)).layers)
    assert healthy is not None
    assert not [a for a in healthy.axes[0].get_children() if (a.get_gid() or "").startswith("zero")]


def test_reports_figures_unit_fractions_named_slots(pathology: tuple[PathologyNet, Report]) -> None:
    _, report = pathology
    rows = [ly for ly in report.layers if ly.dead_fraction is not None or ly.saturation is not None]
    fig = draw_unit_fractions(report.layers, flagged=["act1"])
    assert fig is not None
    (ax,) = fig.axes
    # One integer slot per layer, and its tick label is the layer's name (not "2.1" from "2. 1").
    assert ax.get_xticks().tolist() == list(range(len(rows)))
    assert [t.get_text() for t in ax.get_xticklabels()] == [ly.label for ly in rows] == ["act0", "act1", "act2"]
    bars = [p for p in ax.patches if (p.get_gid() or "").split("-")[0] in ("dead_fraction", "saturation")]
    assert len(bars) == sum((ly.dead_fraction is not None) + (ly.saturation is not None) for ly in rows)
    spans = sorted((b.get_x(), b.get_x() + b.get_width()) for b in bars)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two bars overlap
    height = {b.get_gid(): b.get_height() for b in bars}
    assert height["dead_fraction-1"] == 1.0 and height["dead_fraction-2"] == rows[2].dead_fraction
    assert height["saturation-0"] == rows[0].saturation
    labels = [t.get_text() for t in ax.texts]
    assert "100%" in labels and f"{rows[0].saturation:.0%}" in labels


def test_reports_figures_unit_fractions_both_shares_side_by_side() -> None:
    """A layer with both shares gets two half-width bars in its slot, side by side."""
    from dataclasses import replace

    report = actdiag.inspect(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(8, 4))
    relu = replace(report.layers[1], saturation=0.5, dead_fraction=0.25)
    fig = draw_unit_fractions([report.layers[0], relu])
    assert fig is not None
    dead, sat = (_by_gid(fig.axes[0], g) for g in ("dead_fraction-0", "saturation-0"))
    assert dead.get_x() + dead.get_width() <= sat.get_x()
    assert dead.get_x() >= -0.5 and sat.get_x() + sat.get_width() <= 0.5


def test_reports_figures_weight_norms(pathology: tuple[PathologyNet, Report]) -> None:
    model, report = pathology
    history = report.history
    assert history is not None and len(history.steps) >= 2
    fig = draw_weight_norms(history)
    assert fig is not None
    absolute, relative = fig.axes
    lines = {ln.get_label(): ln for ln in absolute.get_lines()}
    assert set(lines) == {n for n, _ in model.named_parameters() if n.endswith("weight")}  # lines for weights
    for name, ln in lines.items():
        np.testing.assert_allclose(ln.get_ydata(), history.params[name]["weight_norm"])
        np.testing.assert_allclose(ln.get_xdata(), history.steps)
    # The last recorded norm of each weight against the trained model's own (float64): weight decay and updates
    # moved fc2's weight, while fc0 and fc1 got no gradient and only decayed.
    rel = {ln.get_label(): ln.get_ydata() for ln in relative.get_lines()}
    for name in lines:
        assert rel[name][0] == pytest.approx(1.0)
        np.testing.assert_allclose(
            rel[name], np.asarray(history.params[name]["weight_norm"]) / lines[name].get_ydata()[0]
        )
    assert rel["fc0.weight"][-1] < 1.0  # decay only: the norm shrinks
    assert draw_weight_norms(History(steps=(0,), params={"w": {"weight_norm": (1.0,)}})) is None


def test_reports_figures_magnitude_map(pathology: tuple[PathologyNet, Report]) -> None:
    """One image row per layer; the dead layer's activations and the zero-gradient layers' gradients have no
    non-zero value, so their rows are empty; every other row holds its shares (sqrt-scaled) summing to 1."""
    _, report = pathology
    layers = report.layers
    fig = draw_magnitude_map(layers)
    assert fig is not None
    act_img, grad_img = (ax.get_images()[0].get_array() for ax in fig.axes[:2])
    assert act_img.shape[0] == grad_img.shape[0] == len(layers)
    for k, ly in enumerate(layers):
        assert ly.activation is not None and ly.gradient is not None
        np.testing.assert_allclose(
            (np.asarray(act_img[k]) ** 2).sum(), 0.0 if ly.activation.zero_fraction == 1.0 else 1.0, atol=1e-9
        )
        np.testing.assert_allclose(
            (np.asarray(grad_img[k]) ** 2).sum(), 0.0 if ly.gradient.norm == 0.0 else 1.0, atol=1e-9
        )


def test_reports_figures_over_time(pathology: tuple[PathologyNet, Report]) -> None:
    """Distributions over time: one heatmap per layer, the dead layer's on its own (widened) grid; series over time:
    the layers whose gradient is 0 at every step are named on the panel, as a log axis has no line for them."""
    _, report = pathology
    history = report.history
    assert history is not None
    labels = [ly.label for ly in report.layers]
    got = draw_distribution_over_time(history, labels, flagged=["act1"])
    assert got is not None
    fig, note = got
    assert note == ""  # seven layers: all shown
    titled = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left") for ax in titled] == labels
    mesh = titled[labels.index("act0")].collections[0].get_array()
    # Each step's column holds the sqrt of its shares: they sum to 1 (mass conserved by the re-binning).
    cols = np.asarray(mesh).reshape(-1, len(history.hist_steps)) ** 2
    np.testing.assert_allclose(np.nansum(cols, axis=0), 1.0, rtol=1e-9)

    series = draw_series_over_time(history, labels)
    assert series is not None
    grad_ax = series.axes[1]
    zero = [lb for lb in labels if np.all(np.asarray(history.layers[lb]["grad_norm"]) == 0.0)]
    assert zero == ["fc0", "act0", "fc1"]
    assert _by_gid(grad_ax, "zeros-grad_norm").get_text() == "exactly 0 at every step: fc0, act0, fc1"
    drawn = {ln.get_label() for ln in grad_ax.get_lines()}
    assert drawn == set(labels) - set(zero)
    for ln in grad_ax.get_lines():
        np.testing.assert_allclose(ln.get_ydata(), history.layers[ln.get_label()]["grad_norm"])
