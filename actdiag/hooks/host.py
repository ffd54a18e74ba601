"""The host path: statistics of CPU tensors, computed in numpy on the tensor's own memory.

On the CPU the host is the device, so the tensor is read in place through numpy: min and max first (NaN propagates
through them, +-Inf shows as one of them), then sum, sum of squares (a second, centred pass only when the mean
dominates) and the zeros, combined on the host in float64. numpy runs each pass on the calling thread; ATen would
make every op over 32768 elements an OpenMP fork/join across torch's threads, and inside a training step on a busy
machine those cost far more than the arithmetic (see BENCHMARKS.md). A tensor with a non-finite value goes to the
device path's kernel (`device.exact_stats`), which masks them out.

`exact_stats` reads every element for every statistic; `estimated_stats` (recording more often than every 10
steps) reads every element once for the exact count, mean, min and max and takes the spread, the zeros and the
histograms from the fixed sample. `HostBatch` measures a step's small tensors, and the samples of its large ones
when estimating, together when the step ends. Every vector has the layout of `layout.STATS`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from actdiag.hooks import device
from actdiag.hooks.layout import N_EXP, STATS, StatsMeta
from actdiag.hooks.sampling import _BATCH_DTYPES, _CPU, _SAMPLES, numpy_view, segments

# Sums of squares of float32 values leave float32's normal range when |x| nears 2**64 or 2**-63. Tensors whose
# largest magnitude is outside 2**-40 .. 2**40 are therefore scaled by an exact power of two first; the rest (nearly
# all) skip the multiply.
_SAFE_EXP = 40


# The variance comes from one pass (sum and sum of squares) when the mean's square is at most this share of the
# mean square: the subtraction then loses at most one bit. Otherwise (e.g. LayerNorm weights near 1) a second,
# centred pass is made.
_ONE_PASS_MAX_SHARE = 0.5


def _pow2_scale(mn: float, mx: float) -> float:
    """1.0, or the power of two (2**e, |e| <= 100) to divide by when the largest magnitude is outside 2**-40..2**40."""
    e = min(max(math.frexp(max(-mn, mx))[1], -100), 100)
    return math.ldexp(1.0, e) if abs(e) > _SAFE_EXP else 1.0


def exact_stats(a: np.ndarray, mn: float, mx: float, bins: int, sample_n: int) -> torch.Tensor:
    """Statistics of an all-finite CPU tensor `a` (1-D, its own memory), every element read, in numpy.

    Why numpy: see the module docstring (bench/bench_kernel.py --cold compares it with ATen). The passes: min, max
    (done by the caller), sum, sum of squares (einsum: one thread, no BLAS thread pool), a second centred pass only
    when the mean dominates, `x == 0`.
    """
    n = a.size
    scale = _pow2_scale(mn, mx)
    a_s = a if scale == 1.0 else a * a.dtype.type(1.0 / scale)
    # einsum sums pairwise like ndarray.sum (same rounding here), faster on float32.
    mean_s = float(np.einsum("i->", a_s)) / n
    sumsq = float(np.einsum("i,i->", a_s, a_s))
    if n * mean_s * mean_s <= _ONE_PASS_MAX_SHARE * sumsq:
        m2_s = sumsq - n * mean_s * mean_s
    else:
        d = a_s - a_s.dtype.type(mean_s)
        m2_s = float(np.einsum("i,i->", d, d))
    no_zeros = mn > 0 or mx < 0
    zeros = 0 if no_zeros else int(np.count_nonzero(a == 0))

    if sample_n < n:
        sample = a.take(_SAMPLES.get_numpy(n, sample_n))
        sample_zeros = 0 if no_zeros else int(np.count_nonzero(sample == 0))
    else:
        sample, sample_zeros = a, zeros
    vec = np.empty(STATS.length(bins))
    vec[: STATS.head] = STATS.ordered(
        count=float(n), mean=mean_s * scale, m2=m2_s * scale * scale, min=mn, max=mx, zero_count=float(zeros)
    )
    sample_s = sample if scale == 1.0 else sample * sample.dtype.type(1.0 / scale)
    lo_s, span_s = np.array([mn / scale]), np.array([(mx - mn) / scale])
    vec[STATS.head :] = _bin_rows(sample_s[None], _as_float32(sample)[None], lo_s, span_s, bins)[0]
    vec[STATS.exp(bins).start] -= sample_zeros  # zeros share biased exponent 0 with subnormals; zero_count has them
    return torch.from_numpy(vec)


def estimated_stats(a: np.ndarray, bins: int, sample_n: int) -> torch.Tensor | None:
    """Statistics of a large CPU tensor `a` (1-D) when estimates are allowed: the exact parts from every element
    (`exact_parts`), the rest from the fixed sample of `sample_n` elements. None if a value is not finite (the
    caller then takes the exact path, so non-finite counts and the layer where they first appear are exact).

    Exact: count, non-finite count, mean, min and max. Estimated from the sample (`_estimate_rows`): the variance
    (about the exact mean, so unbiased), the zero count (scaled up) and both histograms. Inside a recorded step the
    recorder does the same in two halves: the exact parts and the copy of the sample in the hook, the sample's
    statistics for all tensors at once when the step ends (`HostBatch`).
    """
    n = a.size
    parts = exact_parts(torch.from_numpy(a))
    if parts is None:
        return None
    total, mn, mx = parts
    sample = a.take(_SAMPLES.get_numpy(n, sample_n))
    count, mean, lo, hi = (np.array([v]) for v in (float(n), total / n, mn, mx))
    return torch.from_numpy(_estimate_rows(sample[None], count, mean, lo, hi, bins)[0])


def exact_parts(flat: torch.Tensor) -> tuple[float, float, float] | None:
    """(sum, min, max) of a large CPU tensor: what the estimated path reads from every element; None when a value
    is not finite or the sum overflows (NaN and Inf propagate through all three, with no floating-point warning).

    Unlike the dozens of small ops of a tensor's statistics (see `exact_stats`), these two ops are worth torch's
    threads (BENCHMARKS.md)."""
    total = float(flat.sum())
    mn, mx = (float(v) for v in torch.aminmax(flat))
    if not (math.isfinite(total) and math.isfinite(mn) and math.isfinite(mx)):
        return None
    return total, mn, mx


def _estimate_rows(
    samples: np.ndarray,
    n: np.ndarray,
    mean: np.ndarray,
    mn: np.ndarray,
    mx: np.ndarray,
    bins: int,
    scratch: SizeRows | None = None,
) -> np.ndarray:
    """Vectors (the layout of `STATS`) of K tensors from their samples, one row each.

    `samples` [K, m] holds finite float32 or float64 values; `n` [K] are the tensors' element counts and `mean`,
    `mn`, `mx` [K] their exact mean, min and max, from every element. Estimated from the sample: the variance about
    the exact mean (times n: m2), the zero count (scaled to n) and both histograms (between the exact min and max).
    Rows are independent: each row's numbers are what a batch of that row alone gives. `scratch`: the caller's kept
    buffers (`SizeRows.keys` and `.work`; no allocation, no page faults), and then `samples` is the caller's own
    copy, which may be overwritten (scaled).
    """
    k, m = samples.shape
    # Booleans summed as uint8 into uint16 (exact below 65536 per row), faster than count_nonzero along an axis.
    zeros = np.add.reduce((samples == 0).view(np.uint8), axis=1, dtype=np.uint16 if m < 65536 else np.int64)
    # As in exact_stats: rows whose largest magnitude is outside 2**-40 .. 2**40 are divided by an exact power of two
    # first, so that neither the squares nor `x - min` and `bins / span` overflow or underflow; they are binned by
    # exponent from their values as they were.
    mn_s, mx_s, mean_s = mn.astype(np.float64), mx.astype(np.float64), mean.astype(np.float64)
    e = np.clip(np.frexp(np.maximum(-mn_s, mx_s))[1], -100, 100)
    scale = np.where(np.abs(e) > _SAFE_EXP, np.ldexp(1.0, e), 1.0)
    odd = np.flatnonzero(scale != 1.0)
    samples_s, exp_fix, s32 = samples, None, _as_float32(samples)
    if odd.size:
        inv = 1.0 / scale[odd]
        if scratch is None:
            samples_s = samples.copy()
        else:
            exp_fix = (odd, s32[odd])  # a copy: the rows' values as they were
        samples_s[odd] *= inv[:, None].astype(samples.dtype)
        mn_s[odd] *= inv
        mx_s[odd] *= inv
        mean_s[odd] *= inv
    keys = work = None
    if scratch is not None:
        keys, work = scratch.scratch(samples.size, samples.dtype)
        work = work.reshape(samples.shape)
    # Deviations from c, the mean rounded to the samples' dtype, corrected to the exact mean: sum (x - mean)^2 =
    # sum (x - c)^2 - 2 dc sum (x - c) + m dc^2 with dc = mean - c (where the mean dominates, c's rounding alone
    # would otherwise move the spread).
    c = mean_s.astype(samples.dtype)
    dc = mean_s - c
    work = np.subtract(samples_s, c[:, None], out=work)
    first = np.add.reduce(work, axis=1, dtype=np.float64)
    work *= work
    m2_s = np.maximum(np.add.reduce(work, axis=1, dtype=np.float64) - 2 * dc * first + m * dc * dc, 0.0)
    counts = _bin_rows(samples_s, s32, mn_s, mx_s - mn_s, bins, out=work, keys=keys, exp_fix=exp_fix)
    out = np.empty((k, STATS.length(bins)))
    STATS.put(
        out, count=n, mean=mean, m2=m2_s * scale * scale * (n / m), min=mn, max=mx, zero_count=np.rint(zeros * n / m)
    )
    out[:, STATS.head :] = counts
    # Zeros have biased exponent 0 like subnormals, but zero_count covers them: take the sample's zeros back out.
    out[:, STATS.exp(bins).start] -= zeros
    return out


def _as_float32(values: np.ndarray) -> np.ndarray:
    """`values` as float32, for their exponent bits (float64 values beyond float32's range become Inf: exponent 255,
    the bin that is cut)."""
    if values.dtype == np.float32:
        return values
    with np.errstate(over="ignore"):
        return values.astype(np.float32)


def _bin_rows(
    samples_s: np.ndarray,
    s32: np.ndarray,
    lo_s: np.ndarray,
    span_s: np.ndarray,
    bins: int,
    out: np.ndarray | None = None,
    keys: np.ndarray | None = None,
    exp_fix: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The linear and exponent histograms of each row, [K, bins + N_EXP] counts (exponent bin 0 still holds the
    zeros, which share it with the subnormals).

    `samples_s` [K, m]: finite values in the scaled space of their row (where neither `x - lo` nor `bins / span`
    overflows), binned linearly between `lo_s` and `lo_s + span_s` in their own dtype (a constant row lands in bin
    0); `s32`: the same values unscaled, as float32, binned by exponent from their bits; `out`: scratch of the shape
    and dtype of `samples_s` (it is not written to otherwise); `keys`: int32 scratch of at least 2 * K * m elements;
    `exp_fix`: (row indices, their float32 values) to bin by exponent instead of those rows of `s32`.
    """
    k = samples_s.shape[0]
    dtype = samples_s.dtype
    factor = np.divide(bins, span_s, out=np.zeros_like(span_s), where=span_s > 0).astype(dtype)
    lin = np.subtract(samples_s, lo_s.astype(dtype)[:, None], out=out)
    lin *= factor[:, None]
    offsets = np.arange(k, dtype=np.int32)[:, None] * _row_width(bins)
    return _count_bins(lin, s32, offsets, k, bins, keys, exp_fix)


def _row_width(bins: int) -> int:
    """A row of `_count_bins`: its linear bins, the spare bin after them (a row's maximum, which can round up to
    `bins`), its exponent bins and the exponent-255 bin (Inf/NaN; never hit)."""
    return bins + 1 + N_EXP + 1


def _count_bins(
    lin: np.ndarray,
    s32: np.ndarray,
    offsets: np.ndarray,
    rows: int,
    bins: int,
    scratch: np.ndarray | None = None,
    exp_fix: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """[rows, bins + N_EXP] counts of the values whose linear positions are `lin` (>= 0, in bins; floored here) and
    whose float32 bits are `s32`, each value's two bins offset into its own row by `offsets` (a row is
    `_row_width(bins)` wide; `offsets` broadcasts against `lin`, whose last axis holds the values).

    Every value's two bins are counted by one bincount: int32 keys are half the bytes of intp, and torch.bincount
    takes them as they are (faster for a step's samples than np.bincount, which converts them to intp first). The
    keys are two contiguous blocks (all linear keys, then all exponent keys), written in `scratch` when it is given
    (int32, at least 2 * lin.size elements: kept by the caller, no page faults). `lin` may be overwritten.
    """
    size = lin.size
    if scratch is None or scratch.size < 2 * size:
        scratch = np.empty(2 * size, dtype=np.int32)
    keys = scratch[: 2 * size].reshape(2, *lin.shape)
    expo = keys[1]
    np.bitwise_and(s32.view(np.int32), 0x7FFFFFFF, out=expo)
    np.right_shift(expo, 23, out=expo)
    if exp_fix is not None:  # rows of `lin` [K, m] whose exponents come from other values (`_bin_rows`)
        fix_rows, fix_values = exp_fix
        expo[fix_rows] = np.right_shift(np.bitwise_and(fix_values.view(np.int32), 0x7FFFFFFF), 23)
    expo += offsets + (bins + 1)
    # lin >= 0 already (every value is >= its row's low end, and rounding is monotonic); only a row's maximum can
    # round up to `bins`: it lands in the spare bin, added to the last one below.
    np.copyto(keys[0], lin, casting="unsafe")  # truncation of values >= 0: the floor
    keys[0] += offsets
    width = _row_width(bins)
    counts = torch.bincount(torch.from_numpy(keys).reshape(-1), minlength=rows * width).numpy().reshape(rows, width)
    out = np.empty((rows, bins + N_EXP), dtype=counts.dtype)
    out[:, :bins] = counts[:, :bins]
    out[:, bins - 1] += counts[:, bins]
    out[:, bins:] = counts[:, bins + 1 : bins + 1 + N_EXP]
    return out


class HostBatch:
    """The tensors of a recorded step that are measured together when it ends, on the CPU.

    A transformer or a CNN has dozens of tensors per recorded step, a deep narrow network hundreds, and measured one
    by one each costs dozens of numpy calls: far more than their arithmetic (with the caches cold inside a training
    step; BENCHMARKS.md). Here a tensor costs a copy when it is seen (it may change in place afterwards: an in-place
    ReLU after a Linear, the optimizer), and `finish()` makes a fixed number of numpy calls per tensor size, however
    many tensors share it:

    * small tensors (1..sample_cap elements, float16/bfloat16/float32: biases, norm weights, small weights,
      activations and their gradients) are copied into the row of a float32 buffer of their size, and the rows are
      reduced along their length (`_rows_exact`: float64 sums, float32 deviations, one bincount for both histograms
      of every row). Exact statistics, as `exact_stats` gives each alone; with `small_sample` set (recording
      often), those over `small_sample` elements get their spread, zeros and histograms from their fixed sample of
      that many (`_rows_estimated`), the rest still from every element.
    * with `estimate=True` (recording often), large float32 tensors: the exact parts from every element (sum, min
      and max: count, mean, extremes, non-finite detection) are read in `take()`, which copies the tensor's sample;
      the rest is estimated from the samples of all of them at once (`_estimate_rows`, as `estimated_stats` for one
      tensor). Large tensors recorded exactly are not taken: the caller measures them when they are seen.

    Memory: the buffers are kept from one recorded step to the next (no allocation, no page faults) and given back
    by `release()`. They hold 4 bytes per element of a step's small tensors for the copies and 12 more as each
    size's scratch (histogram keys and deviations), when estimating 4 * small_sample bytes per small tensor for its
    sample, and a sample row (4 * sample_cap bytes) per large tensor: at most 16 * sample_cap bytes per measured
    tensor when exact (128 KB at the default cap of 8192), 20 * sample_cap when estimating (80 KB at every < 10's
    4096), never a copy of a large activation.

    A tensor with a non-finite value (or a float64 tensor, whose values can exceed float32's range) is not taken:
    the caller measures it alone, with the same result as before.
    """

    def __init__(self, bins: int, sample_cap: int, small_sample: int | None = None) -> None:
        self.bins = bins
        self.sample_cap = sample_cap
        # Estimating (recording often): small tensors over this many elements get their spread, zeros and
        # histograms from a fixed sample of this many (`_rows_estimated`); None: small tensors are exact.
        self.small_sample = small_sample
        # small tensors: key -> row of the buffer of its size, and key -> its size. Two dicts of ints, not a tuple
        # per tensor: a step's hundreds of tuples set off collections that promote the step's other objects.
        self.items: dict[Any, int] = {}
        self.sizes: dict[Any, int] = {}
        # One float32 buffer per tensor size, a row per tensor, kept across steps (no allocation, no page faults)
        self._small: dict[int, SizeRows] = {}
        # large tensors: (numel, exact mean, min, max, row of _rows)
        self.large: dict[Any, tuple[int, float, float, float, int]] = {}
        self._rows: np.ndarray | None = None  # the samples of the large ones, kept across steps (no page faults)
        self._used = 0
        self._metas: dict[int, StatsMeta] = {}  # the meta of each small size: they are immutable

    def take(self, key: Any, x: torch.Tensor, estimate: bool = False) -> StatsMeta | None:
        """Keep what `finish()` needs of `x` if it qualifies (see the class docstring); None otherwise."""
        if not x.is_cpu:
            return None
        n = x.numel()
        if n > self.sample_cap:
            return self._take_large(key, x, n) if estimate and x.dtype == torch.float32 else None
        if n == 0 or x.dtype not in _BATCH_DTYPES:
            return None
        rows = self._small.get(n)
        if rows is None:
            rows = self._small[n] = SizeRows(n)
        k, row = rows.next_row()
        # A copy into the step's buffer of this size: the tensor may change in place before the step ends. This runs
        # in a hook for every small tensor of a step: each call here is a measurable share of its cost.
        try:
            if x.dtype == torch.float32:
                np.copyto(row, x.detach().numpy().reshape(-1))
            else:
                torch.from_numpy(row).copy_(x.detach().reshape(-1))
        except RuntimeError:  # a tensor numpy cannot view (e.g. a lazy negation bit)
            rows.used -= 1
            return None
        if self.large:
            self.large.pop(key, None)
        self.items[key] = k  # a key taken again keeps its latest copy
        self.sizes[key] = n
        meta = self._metas.get(n)
        return self._meta(n) if meta is None else meta

    def _meta(self, n: int) -> StatsMeta:
        """The meta of the small tensors of `n` elements (made once: they are immutable)."""
        meta = self._metas.get(n)
        if meta is None:
            cut = self.small_sample
            if cut is not None and n > cut:
                meta = StatsMeta(numel=n, bins=self.bins, sample_n=cut, estimated=True)
            else:
                meta = StatsMeta(numel=n, bins=self.bins, sample_n=n)
            self._metas[n] = meta
        return meta

    def take_many(self, keys: list[Any], xs: list[torch.Tensor]) -> tuple[SizeRows, int] | None:
        """`take()` for float32 CPU tensors of one size (1..sample_cap elements), copied by one call into
        consecutive rows: where a step's parameters are kept when their gradients are ready (hundreds of small
        weights and gradients: a copy each was most of what they cost). The rows and the first row; None (and
        nothing kept) if a tensor cannot be copied so."""
        n = xs[0].numel()
        rows = self._small.get(n)
        if rows is None:
            rows = self._small[n] = SizeRows(n)
        start = rows.next_rows(len(xs))
        try:
            copy_rows(xs, torch.from_numpy(rows.rows[start : rows.used]))
        except RuntimeError:  # e.g. a lazy negation bit, or sizes that differ after all
            rows.used = start
            return None
        items, sizes, large = self.items, self.sizes, self.large
        for i, key in enumerate(keys, start):
            if large:
                large.pop(key, None)
            items[key] = i
            sizes[key] = n
        self._meta(n)
        return rows, start

    def _take_large(self, key: Any, x: torch.Tensor, n: int) -> StatsMeta | None:
        flat = x.detach().reshape(-1)
        a = numpy_view(flat)
        if a is None:
            return None
        parts = exact_parts(flat)
        if parts is None:  # a NaN or Inf, or a sum beyond float32: the exact per-tensor path counts them
            return None
        total, mn, mx = parts
        cap = self.sample_cap
        self.discard(key)
        rows = self._rows
        if rows is None or self._used == rows.shape[0]:
            grown = np.empty((max(8, 2 * self._used), cap), dtype=np.float32)
            if rows is not None:
                grown[: self._used] = rows[: self._used]
            self._rows = rows = grown
        np.take(a, _SAMPLES.get_numpy(n, cap), out=rows[self._used])
        self.large[key] = (n, total / n, mn, mx, self._used)
        self._used += 1
        return StatsMeta(numel=n, bins=self.bins, sample_n=cap, estimated=True)

    def row_of(self, key: Any) -> tuple[SizeRows, int] | None:
        """Where the float32 copy of the small tensor taken under `key` is (its rows and row), if it is kept here."""
        k = self.items.get(key)
        return None if k is None else (self._small[self.sizes[key]], k)

    def rows_of(self, keys: list[Any]) -> np.ndarray | None:
        """The float32 copies of small tensors taken under `keys` (all of one size), as [K, n] rows; None if one
        of them is not (or no longer) kept here, or their sizes differ."""
        if not keys or any(key not in self.items for key in keys):
            return None
        sizes = {self.sizes[key] for key in keys}
        if len(sizes) != 1:
            return None
        return self._small[sizes.pop()].rows[[self.items[key] for key in keys]]

    def discard(self, key: Any) -> None:
        self.items.pop(key, None)
        self.sizes.pop(key, None)
        self.large.pop(key, None)  # its row stays used until the step ends

    def keys(self) -> list[Any]:
        return [*self.items, *self.large]

    def clear(self) -> None:
        """Forget the step's tensors (the buffers are kept for the next step)."""
        self.items = {}
        self.sizes = {}
        self.large = {}
        self._used = 0
        for rows in self._small.values():
            rows.used = 0

    def release(self) -> None:
        """`clear()`, and give the buffers back (when recording stops)."""
        self.clear()
        self._rows = None
        self._small = {}

    def __contains__(self, key: Any) -> bool:
        return key in self.items or key in self.large

    def __len__(self) -> int:
        return len(self.items) + len(self.large)

    def finish(self) -> dict[Any, tuple[np.ndarray, StatsMeta]]:
        """The vectors of every kept tensor (the layout of `tensor_stats`, as numpy rows: they are on the host
        already), keyed as given; the batch is emptied, and the copies `row_of`/`rows_of` gave may be overwritten."""
        items, sizes, large, used = self.items, self.sizes, self.large, self._used
        handed = {n: rows.used for n, rows in self._small.items()}  # rows handed out per size
        self.clear()
        out: dict[Any, tuple[np.ndarray, StatsMeta]] = {}
        if large:
            assert self._rows is not None
            keys = list(large)
            n, mean, mn, mx, row = (np.array(v) for v in zip(*large.values(), strict=True))
            samples = self._rows[:used] if len(row) == used else self._rows[row]  # rows of discarded keys left out
            vecs = _estimate_rows(samples, n.astype(np.float64), mean, mn, mx, self.bins)
            cap = samples.shape[1]
            for i, key in enumerate(keys):
                meta = StatsMeta(numel=int(n[i]), bins=self.bins, sample_n=cap, estimated=True)
                out[key] = (vecs[i], meta)
        if items:
            out.update(self._finish_small(items, sizes, handed))
        return out

    def _finish_small(
        self, items: dict[Any, int], sizes: dict[Any, int], handed: dict[int, int]
    ) -> dict[Any, tuple[np.ndarray, StatsMeta]]:
        """The small tensors, size by size: the rows of a size's buffer ([K, n] float32) are reduced along their
        length, a fixed number of numpy calls per size however many tensors share it, and the histograms of every
        size are counted by one bincount each."""
        by_size: dict[int, list[tuple[Any, int]]] = {}
        for key, k in items.items():
            by_size.setdefault(sizes[key], []).append((key, k))
        out: dict[Any, tuple[np.ndarray, StatsMeta]] = {}
        for n, kept in by_size.items():
            buf = self._small[n]
            ks = [k for _, k in kept]
            # Rows are handed out in order. As many keys as rows handed out: none was discarded or taken again (either
            # leaves a row unused, and a key taken again keeps its place among the keys with a later row), so the
            # keys' rows are the first ones, in order: no copy.
            rows = buf.rows[: len(ks)] if len(ks) == handed[n] else buf.rows[ks]
            meta = self._metas[n]
            if meta.estimated:
                vecs, odd, odd_values = _rows_estimated(rows, meta.sample_n, self.bins, buf)
            else:
                keys, work = buf.scratch(rows.size)
                # In place: the step's copies are not read after this (unit counts and update ratios came first).
                vecs, odd, odd_values = _rows_exact(rows, self.bins, keys, work.reshape(rows.shape), in_place=True)
            for (key, _), vec in zip(kept, vecs, strict=True):  # numpy rows: torch views cost more than all this
                out[key] = (vec, meta)
            if odd.size:  # rows with a non-finite value: in float64
                out.update(self._finish_concatenated({kept[i][0]: v for i, v in zip(odd.tolist(), odd_values)}))
        return out

    def _finish_concatenated(self, items: dict[Any, np.ndarray]) -> dict[Any, tuple[np.ndarray, StatsMeta]]:
        """Small tensors by segment reductions over their concatenation, in float64: the rows the float32 pass of
        `_finish_small` leaves out (a value not finite)."""
        bins = self.bins
        arrays = list(items.values())
        lens, starts = segments(arrays)
        c32 = np.concatenate(arrays)
        c = c32.astype(np.float64)
        # A float64 sum of float32 values cannot overflow: a non-finite sum means a NaN or Inf in the tensor (Inf +
        # -Inf is NaN: numpy's "invalid value" warning would reach the user's training loop).
        with np.errstate(invalid="ignore"):
            sums = np.add.reduceat(c, starts)
        finite = np.isfinite(sums)
        if not finite.all():  # those go the per-tensor way; the rest are measured together as below
            alone = {
                key: _alone(a, bins, self.sample_cap)
                for (key, a), ok in zip(items.items(), finite, strict=True)
                if not ok
            }
            good = {key: a for (key, a), ok in zip(items.items(), finite, strict=True) if ok}
            return {**alone, **self._finish_concatenated(good)} if good else alone
        count = len(arrays)
        seg = np.repeat(np.arange(count, dtype=np.int32), lens)  # each value's tensor
        n = lens.astype(np.float64)
        mn = np.minimum.reduceat(c, starts)
        mx = np.maximum.reduceat(c, starts)
        mean = sums / n
        d = c - mean.take(seg)
        d *= d
        m2 = np.add.reduceat(d, starts)
        zeros = np.add.reduceat(c == 0, starts, dtype=np.int64)
        # Linear bins between each tensor's own min and max (a constant tensor lands in bin 0), exponent bins from
        # the float32 bits; each tensor's bins are offset into its own row of one bincount.
        span = mx - mn
        k = np.divide(bins, span, out=np.zeros_like(span), where=span > 0)
        lin = np.subtract(c, mn.take(seg), out=d)
        lin *= k.take(seg)
        seg *= _row_width(bins)
        vecs = np.empty((count, STATS.length(bins)))
        STATS.put(vecs, count=n, mean=mean, m2=m2, min=mn, max=mx, zero_count=zeros)
        vecs[:, STATS.head :] = _count_bins(lin, c32, seg, count, bins)
        vecs[:, STATS.exp(bins).start] -= zeros  # zeros share biased exponent 0 with subnormals; zero_count has them
        metas: dict[int, StatsMeta] = {}  # one per size: they are immutable
        out: dict[Any, tuple[np.ndarray, StatsMeta]] = {}
        for key, a, vec in zip(items, arrays, vecs, strict=True):
            meta = metas.get(a.size)
            if meta is None:
                meta = metas[a.size] = StatsMeta(numel=a.size, bins=bins, sample_n=a.size)
            out[key] = (vec, meta)
        return out


def _alone(a: np.ndarray, bins: int, sample_cap: int) -> tuple[np.ndarray, StatsMeta]:
    """A small float32 copy holding a non-finite value, measured by itself (the device path's kernel masks them)."""
    n = a.size
    vec = device.exact_stats(torch.from_numpy(a), bins, n, sample_cap).numpy()
    return vec, StatsMeta(numel=n, bins=bins, sample_n=n)


def copy_rows(xs: list[torch.Tensor], out: torch.Tensor) -> None:
    """Row i of `out` [K, n] := `xs[i]` flattened (K tensors of n elements). Tensors of one shape are copied as
    they are, under no_grad, into a view of `out` in that shape: a detached, flattened view of each cost three
    times the copy. Raises RuntimeError where torch cannot copy them so (e.g. a lazy negation bit)."""
    shape = xs[0].shape
    if all(x.shape == shape for x in xs):
        with torch.no_grad():
            torch.stack(xs, out=out.view(len(xs), *shape))
    else:
        torch.stack([x.detach().reshape(-1) for x in xs], out=out)


class SizeRows:
    """The rows that hold a recorded step's copies of one size (float32 for `HostBatch`; the weights' own dtype for
    the update ratios), doubled when full and kept across steps (no allocation, no page faults)."""

    def __init__(self, n: int, dtype: Any = np.float32) -> None:
        self.rows = np.empty((8, n), dtype=dtype)
        self.keys = np.empty(0, dtype=np.int32)  # scratch for the histogram keys (`scratch`)
        self.work = np.empty(0, dtype=np.float32)  # scratch for the deviations (`scratch`)
        self.sample = np.empty(0, dtype=np.float32)  # the rows' samples, estimating (`_rows_estimated`)
        self.used = 0

    def scratch(self, size: int, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """Kept scratch for statistics of `size` values: int32 histogram keys (2 * size) and deviations (size, of
        `dtype`), grown to the rows' size when short (no allocation from step to step, no page faults)."""
        at_least = max(size, self.rows.size)
        if self.keys.size < 2 * size:
            self.keys = np.empty(2 * at_least, dtype=np.int32)
        if self.work.size < size or self.work.dtype != dtype:
            self.work = np.empty(at_least, dtype=dtype)
        return self.keys[: 2 * size], self.work[:size]

    def next_row(self) -> tuple[int, np.ndarray]:
        if self.used == self.rows.shape[0]:
            self._grow(self.used + 1)
        self.used += 1
        return self.used - 1, self.rows[self.used - 1]

    def next_rows(self, k: int) -> int:
        """Hand out `k` consecutive rows; the first one's index."""
        if self.used + k > self.rows.shape[0]:
            self._grow(self.used + k)
        self.used += k
        return self.used - k

    def _grow(self, at_least: int) -> None:
        grown = np.empty((max(2 * self.rows.shape[0], at_least), self.rows.shape[1]), dtype=self.rows.dtype)
        grown[: self.used] = self.rows[: self.used]
        self.rows = grown


# Rows whose largest magnitude is within 2**-90 .. 2**100 are measured in float32 (`_rows_exact`) as they are: there
# `x - min` and `bins / span` cannot overflow (a non-constant span is at least 2**-113). Finite rows outside that range
# (a deep network's vanishing activations, say) are first divided by the power of two that brings their largest
# magnitude into [0.5, 1) (exact, but for values that fall below float32's normal range next to a huge one: they
# then weigh nothing in the sums either); their extremes, zeros and exponents come from the values as they were.
# Deviations of rows outside 2**-30 .. 2**40 are scaled by an exact power of two before they are squared, so that
# their squares neither overflow nor fall into float32's subnormals.
_F32_LOW, _F32_HIGH = 2.0**-90, 2.0**100
_SQUARE_LOW, _SQUARE_HIGH = 2.0**-30, 2.0**40


def _rows_exact(
    rows: np.ndarray,
    bins: int,
    keys: np.ndarray | None = None,
    work: np.ndarray | None = None,
    in_place: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact statistics of each row of `rows` [K, n] (float32, every element of a small tensor), as [K, STATS.length]
    vectors, the indices of the rows left to the caller (their vectors are garbage): those with a non-finite value,
    and those rows' values. `keys` (int32, 2 * K * n) and `work` (float32, [K, n]): scratch the caller keeps from
    step to step. `in_place`: rows may be overwritten (scaled) instead of copied first.

    Sums are float64 over the float32 values (pairwise along each row); the spread is the float64 sum of float32
    squared deviations from the float32-rounded mean c, less n * (mean - c)**2 (an identity, no cancellation: c is
    within one float32 rounding of the mean)."""
    k, n = rows.shape
    with np.errstate(invalid="ignore"):  # Inf + -Inf: numpy's warning would reach the user's training loop
        sums = np.add.reduce(rows, axis=1, dtype=np.float64)
        mn = rows.min(axis=1)
        mx = rows.max(axis=1)
        big = np.maximum(-mn, mx).astype(np.float64)
        finite = np.isfinite(sums)  # a float64 sum of float32 values overflows only through an Inf or a NaN
        outside = finite & ((big > _F32_HIGH) | ((big < _F32_LOW) & (big > 0)))
    odd = np.flatnonzero(~finite)
    moved = np.flatnonzero(outside)
    zeros = np.add.reduce((rows == 0).view(np.uint8), axis=1, dtype=np.uint16 if n < 65536 else np.int64)
    unit = np.ones(k)  # each row's power of two (1 for nearly all)
    exp_fix = None
    # The rows changed below, as they were (a copy): binned by exponent from these, and the non-finite ones (first)
    # handed back to the caller.
    changed = np.concatenate([odd, moved])  # disjoint: a moved row is finite
    saved = rows[changed]
    odd_values = saved[: odd.size]
    if changed.size:
        exp_fix = (changed, saved)
        if not in_place:
            rows = rows.copy()
        if odd.size:  # measured as zeros here (so that nothing overflows or warns), then by the caller
            rows[odd] = 0
            sums[odd] = 0
            mn[odd] = mx[odd] = big[odd] = 0
        if moved.size:
            unit[moved] = np.ldexp(1.0, np.frexp(big[moved])[1])
            rows[moved] = rows[moved] / unit[moved][:, None]  # in float64, then back: exact (see above)
            sums[moved] = np.add.reduce(rows[moved], axis=1, dtype=np.float64)
            big[moved] /= unit[moved]
    mn_s = mn.astype(np.float64) / unit
    mx_s = mx.astype(np.float64) / unit
    mean = sums / n
    c = mean.astype(np.float32)
    d = np.subtract(rows, c[:, None], out=work)
    dc = mean - c.astype(np.float64)
    scaled = np.flatnonzero((big > _SQUARE_HIGH) | ((big < _SQUARE_LOW) & (big > 0)))
    scale = np.ones(k)
    if scaled.size:  # powers of two: exact
        scale[scaled] = np.ldexp(1.0, np.frexp(big[scaled])[1])
        d[scaled] *= (1.0 / scale[scaled]).astype(np.float32)[:, None]
    d *= d
    m2 = (np.add.reduce(d, axis=1, dtype=np.float64) - n * (dc / scale) ** 2) * scale * scale
    vecs = np.empty((k, STATS.length(bins)))
    STATS.put(
        vecs,
        count=float(n),
        mean=mean * unit,
        m2=np.maximum(m2, 0.0) * unit * unit,
        min=mn,
        max=mx,
        zero_count=zeros.astype(np.float64),
    )
    # Exponents from the values as they were (a NaN or Inf of a row left to the caller counts in the cut bin 255).
    vecs[:, STATS.head :] = _bin_rows(rows, rows, mn_s, mx_s - mn_s, bins, out=d, keys=keys, exp_fix=exp_fix)
    vecs[:, STATS.exp(bins).start] -= zeros  # zeros share biased exponent 0 with subnormals; zero_count has them
    return vecs, odd, odd_values


def _rows_estimated(
    rows: np.ndarray, sample_n: int, bins: int, buf: SizeRows
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_rows_exact` when estimates are allowed: the count, mean (a float64 sum), min and max of each row [K, n] from
    every element; the spread, the zeros and both histograms from the row's fixed sample of `sample_n` elements
    (`_estimate_rows`, as for a large tensor), in `buf`'s kept buffers. Rows with a non-finite value are left to the
    caller, as there."""
    k, n = rows.shape
    with np.errstate(invalid="ignore"):  # Inf + -Inf: numpy's warning would reach the user's training loop
        sums = np.add.reduce(rows, axis=1, dtype=np.float64)
    finite = np.isfinite(sums)  # a float64 sum of float32 values overflows only through an Inf or a NaN
    odd = np.flatnonzero(~finite)
    odd_values = rows[odd]
    vecs = np.zeros((k, STATS.length(bins)))
    good = np.flatnonzero(finite) if odd.size else slice(None)
    part = rows[good]
    kept = part.shape[0]
    if kept:
        if buf.sample.size < kept * sample_n:
            buf.sample = np.empty(max(kept, buf.rows.shape[0]) * sample_n, dtype=np.float32)
        samples = buf.sample[: kept * sample_n].reshape(kept, sample_n)
        # torch's gather along rows is about twice numpy's take here
        torch.index_select(torch.from_numpy(part), 1, _SAMPLES.get(n, sample_n, _CPU), out=torch.from_numpy(samples))
        count = np.full(kept, float(n))
        mean = sums[good] / n
        vecs[good] = _estimate_rows(samples, count, mean, part.min(axis=1), part.max(axis=1), bins, scratch=buf)
    return vecs, odd, odd_values
