"""Numbers behind the figures: rebinning histograms onto a common grid, exponent shares as a matrix, which layers a
figure shows. Plain numpy, no matplotlib."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from actdiag.records import E_LOW, ExponentHistogram

if TYPE_CHECKING:
    pass


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
