"""Statistics of one tensor: the entry point that picks a kernel path, and the per-unit activation counts.

`tensor_stats(x)` returns a small float64 vector on `x`'s own device, laid out as `layout.STATS` (named slots, then
a linear and an exponent histogram), and its `StatsMeta`. Nothing in it reads a value back to the host, so the
recorder can concatenate the vectors of a whole step and read them back with a single copy; `decode_many` turns
them into `TensorStats`.

Two paths compute the same numbers, each exact or estimated:

* the *host* path (`host.py`) is the CPU's, for all-finite tensors: numpy on the tensor's own memory, on the
  calling thread (its module docstring says why);
* the *device* path (`device.py`) works whatever the tensor holds (non-finite values are masked out) and never
  synchronises: the path of CUDA tensors, and of CPU tensors with a non-finite value. On its exact path a float32,
  float16 or bfloat16 tensor goes to the fused Triton kernel (`fused.py`) where `fused.fused_available` says so
  (CUDA with triton importable, or ACTDIAG_FUSED=1): every element then feeds the histograms too.

*Exact* reads every element for every statistic. *Estimated* (the recorder's choice when recording more often than
every 10 steps) still reads every element for the count, mean, min, max and the non-finite count, and takes the
spread, the zeros and the histograms from the tensor's fixed sample (CONTRACT.md, "Exactness").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from actdiag.hooks import device, fused, host
from actdiag.hooks.layout import N_EXP, STATS, Layout, StatsMeta, decode_many, decode_tensor_stats, with_extra_slots
from actdiag.hooks.sampling import _NUMPY_FLOATS, _SAMPLES, DEFAULT_SAMPLE_CAP, _autocast_on, _work_dtype, numpy_view

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_SAMPLE_CAP",
    "N_EXP",
    "STATS",
    "_SAMPLES",
    "Path",
    "StatsMeta",
    "decode_many",
    "decode_tensor_stats",
    "saturation_count",
    "tensor_stats",
    "unit_activity",
    "unit_activity_device",
    "unit_activity_rows",
    "units_in_numpy",
    "unit_dim_for",
    "unit_positive_counts",
]

# Which kernels measure a tensor: None picks the host path for CPU tensors, the device path for the rest; "device"
# forces the device path on the CPU too (tests use it to check that path without a GPU).
Path = Literal["host", "device"]


def on_host(x: torch.Tensor, path: Path | None) -> bool:
    """Whether `x` takes the host path (see `Path`)."""
    return path != "device" and x.device.type == "cpu"


DEFAULT_BINS = 64


def tensor_stats(
    x: torch.Tensor,
    *,
    bins: int = DEFAULT_BINS,
    sample_cap: int = DEFAULT_SAMPLE_CAP,
    path: Path | None = None,
    exact: bool = True,
    layout: Layout = STATS,
) -> tuple[torch.Tensor, StatsMeta]:
    """Statistics of `x` as a float64 vector on x's device (laid out as `layout`) and its meta.

    `path`: see `Path`. `exact=False` lets a large floating tensor's spread, zeros and histograms come from its
    sample (the meta then says `estimated`). `layout`: `STATS`, or a copy with more slots (`Layout.with_slot`),
    whose kernels run after the path's own.
    """
    x = x.detach()
    numel = x.numel()
    sample_n = min(numel, sample_cap)
    if numel == 0:
        return layout.empty_vector(bins, x.device), StatsMeta(numel=numel, bins=bins, sample_n=sample_n, layout=layout)
    estimate = not exact and sample_n < numel and x.is_floating_point()
    if not estimate and not on_host(x, path) and fused.fused_supported(x) and fused.fused_available(x.device):
        # The fused kernel reads every element for the histograms too: nothing is sampled.
        vec, estimated, sample_n = fused.fused_vectors([x], bins=bins)[0], False, numel
    else:
        vec, estimated = _measure(x, bins, sample_cap, sample_n, path, estimate)
    meta = StatsMeta(numel=numel, bins=bins, sample_n=sample_n, estimated=estimated, layout=layout)
    return with_extra_slots(vec, x, layout, bins), meta


def _measure(
    x: torch.Tensor, bins: int, sample_cap: int, sample_n: int, path: Path | None, estimate: bool
) -> tuple[torch.Tensor, bool]:
    """The `STATS` vector of non-empty `x` from the path's torch or numpy kernels (exact, or estimated where
    `estimate` allows it), and whether it estimated."""
    wd = _work_dtype(x)
    # Statistics of half-precision tensors accumulate in float32; autocast must not push our ops back to half.
    # (Entering the context costs more than some of the kernels, so it is entered only when autocast is on.)
    dev = x.device.type
    with torch.autocast(device_type=dev, enabled=False) if _autocast_on(dev) else contextlib.nullcontext():
        if not on_host(x, path):
            if estimate:
                return device.estimated_stats(x.reshape(-1), wd, bins, sample_n), True
            return device.exact_stats(_flat(x, wd), bins, sample_n, sample_cap), False
        xf = _flat(x, wd)
        # The host path reads the tensor in place through numpy. Knowing min and max first lets the rest run
        # without masks (NaN propagates through min/max, +-Inf shows as one of them).
        a = numpy_view(xf)  # None (e.g. a lazy negation bit): the device path
        if a is not None and estimate:
            est = host.estimated_stats(a, bins, sample_n)
            if est is not None:
                return est, True
        if a is not None:
            mn, mx = float(a.min()), float(a.max())
            if math.isfinite(mn) and math.isfinite(mx):
                return host.exact_stats(a, mn, mx, bins, sample_n), False
        return device.exact_stats(xf, bins, sample_n, sample_cap), False


def _flat(x: torch.Tensor, wd: torch.dtype) -> torch.Tensor:
    xf = x.reshape(-1)
    return xf if xf.dtype == wd else xf.to(wd)


def unit_dim_for(shape: tuple[int, ...], channels_first: bool) -> int | None:
    """The dimension holding units (features or channels) of an activation, or None for scalars/vectors.

    [N, F] -> 1; [N, C, *spatial] from a conv -> 1; [N, T, F] (sequences) -> last.
    """
    nd = len(shape)
    if nd < 2:
        return None
    if nd == 2:
        return 1
    if nd >= 4 or channels_first:
        return 1
    return nd - 1


def units_in_numpy(y: torch.Tensor, ever_active: torch.Tensor, path: Path | None) -> bool:
    """Whether `unit_activity` counts the units of `y` in numpy (else with device ops)."""
    return on_host(y, path) and y.dtype in _NUMPY_FLOATS and ever_active.is_cpu


def unit_activity(
    y: torch.Tensor,
    unit_dim: int,
    ever_active: torch.Tensor,
    rare_below: float,
    *,
    path: Path | None = None,
    streak: torch.Tensor | None = None,
) -> torch.Tensor:
    """[dead, rare, never] unit counts for a ReLU-family output, on y's device; updates `ever_active` in place,
    and `streak` (int32 per unit, `actdiag.hooks.tracking`: recorded calls silent in a row) when given.
    `path` as in `tensor_stats`: "device" keeps to device ops even on the CPU.

    dead: units with no positive output for any sample of this call; rare: units positive for fewer than
    `rare_below` of their samples; never: units not positive in any recorded call so far.
    """
    yd = y.detach()
    per_unit = yd.shape[unit_dim]
    samples = yd.numel() // max(per_unit, 1)
    if units_in_numpy(yd, ever_active, path):
        # On the CPU in numpy, one thread, no OpenMP fork/join (see host.py); autocast does not reach numpy.
        counts = unit_activity_rows(yd.numpy()[None], tuple(yd.shape), unit_dim, [ever_active], [streak], rare_below)
        return torch.from_numpy(counts[0])
    active = unit_positive_counts(yd, unit_dim)[None]
    return unit_activity_device(active, samples, [ever_active], [streak], rare_below)[0]


def unit_positive_counts(y: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """How many positive values each unit of `y` has, as int64 [units], device ops only (two: a compare and a
    sum; autocast touches neither). NaN is not positive, as on the host path: a unit with a NaN and a positive
    value is active. The recorder takes these in a ReLU's hook (its output may change in place later) and
    leaves the rest to `unit_activity_device`, once for all the step's outputs of one shape."""
    return torch.sum(y.detach() > 0, dim=[d for d in range(y.dim()) if d != unit_dim])


def unit_activity_device(
    active: torch.Tensor,
    samples: int,
    ever_active: Sequence[torch.Tensor],
    streaks: Sequence[torch.Tensor | None],
    rare_below: float,
) -> torch.Tensor:
    """`unit_activity` of K outputs of one shape from their per-unit positive counts (`active` [K, units], rows of
    `unit_positive_counts`), with a fixed number of device ops whatever K: each output's `ever_active` and `streak`
    are updated in place (stacked, updated, written back by one `_foreach_copy_` each; a single output updates
    them through a view). Returns [K, 3] float64 counts (dead, rare, never) on the device. `streaks` are all
    tensors or all None."""
    k = active.shape[0]
    alive = active > 0
    ever = ever_active[0][None] if k == 1 else torch.stack(list(ever_active))
    ever.logical_or_(alive)
    tracked = [s for s in streaks if s is not None]
    if tracked:
        if len(tracked) != k:
            raise ValueError("unit_activity_device takes a streak for every output or for none")
        streak = tracked[0][None] if k == 1 else torch.stack(tracked)
        streak.add_(1).masked_fill_(alive, 0)
    # Counted as the units minus those alive, not rare, ever active: one stack and one sum for the three.
    kept = torch.stack([alive, active >= rare_below * samples, ever]).sum(2, dtype=torch.float64)
    counts = torch.rsub(kept, active.shape[1]).t()
    if k > 1:  # the stacked copies back into each output's own tensors
        torch._foreach_copy_(list(ever_active), list(ever.unbind(0)))
        if tracked:
            torch._foreach_copy_(tracked, list(streak.unbind(0)))
    return counts


def unit_activity_rows(
    rows: np.ndarray,
    shape: tuple[int, ...],
    unit_dim: int,
    ever_active: Sequence[torch.Tensor],
    streaks: Sequence[torch.Tensor | None],
    rare_below: float,
) -> np.ndarray:
    """`unit_activity` of K CPU outputs of one shape at once: `rows` [K, ...] holds their values (each row one
    output, any layout numpy can reshape to `shape`), `ever_active` and `streaks` their CPU tensors, updated in
    place. Returns [K, 3] float64 counts (dead, rare, never).

    The booleans are viewed as uint8 and summed into uint16 where no count can reach 65536: faster than a sum into
    int32 over all the other dimensions at once. [K, before, units, after]: a conv output sums H*W first."""
    k = rows.shape[0]
    before, units = math.prod(shape[:unit_dim]), shape[unit_dim]
    pos = (rows > 0).view(np.uint8).reshape(k, before, units, -1)
    after = pos.shape[3]
    if after > 1:
        part = np.add.reduce(pos, axis=3, dtype=np.uint16 if after < 65536 else np.int64)
        active = part.sum(axis=1, dtype=np.int64)
    else:
        active = np.add.reduce(pos[:, :, :, 0], axis=1, dtype=np.uint16 if before < 65536 else np.int64)
    alive = active > 0
    counts = np.empty((k, 3))
    counts[:, 0] = units - np.count_nonzero(alive, axis=1)
    counts[:, 1] = np.count_nonzero(active < rare_below * (before * after), axis=1)
    for i, (ever, streak) in enumerate(zip(ever_active, streaks, strict=True)):
        ever_np = ever.numpy()  # the same memory: updated in place
        np.logical_or(ever_np, alive[i], out=ever_np)
        counts[i, 2] = units - np.count_nonzero(ever_np)
        if streak is not None:
            streak_np = streak.numpy()  # the same memory: updated in place
            streak_np += 1
            streak_np[alive[i]] = 0
    return counts


def saturation_count(y: torch.Tensor, lo: float, hi: float, tol: float, *, path: Path | None = None) -> torch.Tensor:
    """Number of elements within `tol` of either bound, as a 1-element float64 tensor on y's device."""
    with torch.autocast(device_type=y.device.type, enabled=False):
        yd = y.detach()
        mid = (lo + hi) / 2
        half = (hi - lo) / 2
        # On the CPU in numpy, as on the host path.
        if on_host(yd, path) and yd.dtype in _NUMPY_FLOATS:
            a = yd.numpy()
            t = a.dtype.type
            return torch.tensor([float(np.count_nonzero(np.abs(a - t(mid)) >= t(half - tol)))], dtype=torch.float64)
        n = ((yd - mid).abs() >= half - tol).sum()
        return n.to(torch.float64).reshape(1)
