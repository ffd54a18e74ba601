"""Independent float64 numpy references for the reliability tests (no actdiag code is used here)."""

from __future__ import annotations

from typing import Any

import numpy as np

from actdiag.records import E_HIGH, E_LOW


def np_stats(x: np.ndarray, bins: int = 64) -> dict[str, Any]:
    """count, mean, m2, min, max, zero_count, numel and exponent counts of x's finite values, in float64."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    fin = flat[np.isfinite(flat)]
    out: dict[str, Any] = {"numel": flat.size, "count": fin.size, "zero_count": int((flat == 0).sum())}
    if fin.size:
        mean = float(fin.mean())
        out.update(mean=mean, m2=float(((fin - mean) ** 2).sum()), min=float(fin.min()), max=float(fin.max()))
    nz = fin[fin != 0]
    expo = np.frexp(nz.astype(np.float32))[1].astype(np.int64)
    counts = np.zeros(E_HIGH - E_LOW + 1)
    np.add.at(counts, np.clip(expo - E_LOW, 0, E_HIGH - E_LOW), 1)
    out["exponents"] = counts
    if fin.size and fin.max() > fin.min():
        lo, hi = fin.min(), fin.max()
        idx = np.clip(np.floor((fin - lo) * (bins / (hi - lo))), 0, bins - 1).astype(np.int64)
        out["lin"] = np.bincount(idx, minlength=bins).astype(np.float64)
    return out
