"""The figure helpers' numerics: re-binning histograms onto a common grid, exponent matrices, layer selection, and
the SVG post-processing that keeps the report small without changing what is drawn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actdiag.records import E_LOW, ExponentHistogram, Histogram, History
from actdiag.reports.figures import (
    _axis_moves,
    _log_label,
    distribution_over_time,
    exponent_matrix,
    rebin,
    select_layers,
)

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
