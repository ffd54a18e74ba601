"""On-device statistic kernels.

`tensor_stats(x)` returns a small float64 vector on `x`'s own device, laid out as

    [count, mean, m2, min, max, zero_count, lin_0 .. lin_{B-1}, exp_0 .. exp_{NE-1}]

where `count` is the number of finite values, `m2` the sum of squared deviations from their mean, `lin_*` a linear
histogram of B bins between min and max and `exp_*` the exponent histogram (see `actdiag.records.E_LOW`). Nothing in
it reads a value back to the host, so the recorder can concatenate the vectors of a whole step and read them back
with a single copy. `decode_tensor_stats` turns one vector (as numpy) into a `TensorStats`.

Two code paths compute the same numbers:

* the *masked* path works whatever the tensor holds: non-finite values are masked out with `torch.where`. It never
  synchronises, so it is the path for CUDA tensors.
* the *fast* path is the CPU's, for all-finite tensors. On the CPU the host is the device, so the tensor is read in
  place through numpy: min and max first (NaN propagates through them, +-Inf shows as one of them), then sum, sum of
  squares (a second, centred pass only when the mean dominates) and the zeros, combined on the host in float64.
  numpy runs each pass on the calling thread; ATen would make every op over 32768 elements an OpenMP fork/join
  across torch's threads, and inside a training step on a busy machine those cost 100x the arithmetic (measured in
  BENCHMARKS.md).

Histograms are built from at most `sample_cap` elements: tensors larger than that are sampled with a fixed
pseudo-random index (a private generator, so the user's RNG state is untouched) and the histogram is marked
`sampled`. Moments, min/max, zero and non-finite counts use every element, except with `exact=False`: then the count,
mean and non-finite values come from every element and the rest from the sample, marked `estimated`
(`_stats_estimated` on the CPU, one pass; `_stats_estimated_masked` on the device path, one write and two reads of
the tensor where its exact statistics move ~4x the bytes). A step's small CPU tensors, and with `exact=False` the
samples of its large ones, are measured together at its end (`StepBatch`); on the device path, `DeviceBatch` does
the same with one set of device ops for all of them. Counting into bins uses `bincount` on
the CPU and `histc` with constant bounds on CUDA (`bincount` on CUDA reads its maximum back to size its output, a
hidden synchronisation).
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actdiag.records import E_HIGH, E_LOW, ExponentHistogram, Histogram, TensorStats

DEFAULT_BINS = 64
# Histograms (and, with exact=False, a large tensor's spread and extremes) come from at most 8192 elements. A bin
# holding a share p of the values is then known to sqrt(p(1-p)/8192) <= 0.55% of the total, and a Gaussian tensor's
# std estimate to about 0.8%. The sample's work is per tensor, whatever its size: 32768 elements cost ~4x the
# time of 8192 for no visible change in a 64-bin histogram (bench/bench_kernel.py). Below ATen's GRAIN_SIZE
# (32768), every op on the sample runs on the calling thread, with no OpenMP fork/join.
DEFAULT_SAMPLE_CAP = 8192
N_EXP = E_HIGH - E_LOW + 1  # 255 float32 binades: biased exponents 0 (subnormal) .. 254
HEAD = 6  # count, mean, m2, min, max, zero_count


@dataclass(frozen=True, slots=True)
class StatsMeta:
    """What the host knows about a vector without reading it: sizes and layout."""

    numel: int
    bins: int
    sample_n: int  # elements that went into the histograms
    estimated: bool = False  # spread, extremes and zeros estimated from those elements (see _stats_estimated)

    @property
    def length(self) -> int:
        return HEAD + self.bins + N_EXP

    @property
    def sampled(self) -> bool:
        return self.sample_n < self.numel


def vector_length(bins: int) -> int:
    return HEAD + bins + N_EXP


class _SampleIndex:
    """Fixed pseudo-random element indices per (numel, cap, device), LRU-bounded.

    The indices are drawn by a private generator on the tensor's own device: the user's RNG state is untouched, and
    no host-to-device copy is needed (a pageable copy to CUDA would synchronise). Sorted, so the gather walks memory
    forward.
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._cache: OrderedDict[tuple[int, int, str], torch.Tensor] = OrderedDict()
        self._numpy: dict[tuple[int, int], np.ndarray] = {}
        self._max = max_entries

    def get(self, numel: int, cap: int, device: torch.device) -> torch.Tensor:
        key = (numel, cap, str(device))
        idx = self._cache.get(key)
        if idx is not None:
            self._cache.move_to_end(key)
            return idx
        seed = numel * 1_000_003 + cap
        try:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            idx = torch.randint(0, numel, (cap,), generator=gen, device=device).sort().values
        except RuntimeError:  # a device without its own generator: draw on the CPU once, copy once
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            idx = torch.randint(0, numel, (cap,), generator=gen).sort().values.to(device)
        self._cache[key] = idx
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return idx

    def get_numpy(self, numel: int, cap: int) -> np.ndarray:
        """The CPU indices of `get` as a numpy array (cached beside them: the CPU path asks for them per tensor)."""
        key = (numel, cap)
        idx = self._numpy.get(key)
        if idx is None:  # the array keeps its tensor alive
            idx = self.get(numel, cap, _CPU).numpy()
            self._numpy[key] = idx
            if len(self._numpy) > self._max:
                self._numpy.pop(next(iter(self._numpy)))
        return idx


_CPU = torch.device("cpu")
_SAMPLES = _SampleIndex()


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # an unknown device type: be safe and switch autocast off
        return True


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    if x.dtype == torch.float64 or x.dtype in (torch.int64, torch.int32):
        return torch.float64
    return torch.float32


def tensor_stats(
    x: torch.Tensor,
    *,
    bins: int = DEFAULT_BINS,
    sample_cap: int = DEFAULT_SAMPLE_CAP,
    sync_free: bool | None = None,
    exact: bool = True,
) -> tuple[torch.Tensor, StatsMeta]:
    """Statistics of `x` as a float64 vector on x's device (layout in the module docstring) and its meta.

    `sync_free=None` picks the masked path on CUDA and the fast path on the CPU when all values are finite;
    True forces the masked path (tests use it to check that path on the CPU). `exact=False` lets a large floating
    tensor's spread, extremes and zeros be estimated from its sample (the meta then says `estimated`): on the CPU
    `_stats_estimated`, on the device path `_stats_estimated_masked`.
    """
    x = x.detach()
    numel = x.numel()
    sample_n = min(numel, sample_cap)
    meta = StatsMeta(numel=numel, bins=bins, sample_n=sample_n)
    if numel == 0:
        out = torch.zeros(meta.length, dtype=torch.float64, device=x.device)
        out[3] = math.inf
        out[4] = -math.inf
        return out, meta
    wd = _work_dtype(x)
    # Statistics of half-precision tensors accumulate in float32; autocast must not push our ops back to half.
    # (Entering the context costs more than some of the kernels, so it is entered only when autocast is on.)
    dev = x.device.type
    with torch.autocast(device_type=dev, enabled=False) if _autocast_on(dev) else contextlib.nullcontext():
        if sync_free is None:
            sync_free = x.device.type != "cpu"
        if sync_free and not exact and sample_n < numel and x.is_floating_point():
            vec = _stats_estimated_masked(x.reshape(-1), wd, bins, sample_n)
            return vec, StatsMeta(numel=numel, bins=bins, sample_n=sample_n, estimated=True)
        xf = x.reshape(-1)
        if xf.dtype != wd:
            xf = xf.to(wd)
        if not sync_free and xf.device.type == "cpu":
            # On the CPU the host *is* the device: the tensor is read in place through numpy. Knowing min and max
            # first lets the rest run without masks (NaN propagates through min/max, +-Inf shows as one of them).
            a = numpy_view(xf)  # None (e.g. a lazy negation bit): the device path
            if a is not None and not exact and sample_n < numel:
                est = _stats_estimated(a, bins, sample_n)
                if est is not None:
                    return est, StatsMeta(numel=numel, bins=bins, sample_n=sample_n, estimated=True)
            if a is not None:
                mn, mx = float(a.min()), float(a.max())
                if math.isfinite(mn) and math.isfinite(mx):
                    return _stats_fast(a, mn, mx, bins, sample_n), meta
        return _stats_masked(xf, bins, sample_n, sample_cap), meta


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


def _stats_fast(a: np.ndarray, mn: float, mx: float, bins: int, sample_n: int) -> torch.Tensor:
    """The CPU path for all-finite tensors, in numpy on the tensor's own memory.

    Why numpy: every ATen op over more than 32768 elements is an OpenMP fork/join across torch's threads, and in a
    training step (caches cold, other processes on the cores) each can cost far more than its arithmetic. Measured
    with cold caches on 2 cores (bench/bench_kernel.py --cold): the ~50-op ATen version took 1.4-2.3 ms per
    256x1024 or 1024x1024 tensor on a quiet machine and 70-570 ms at load average ~10; these ~15 numpy calls on the
    calling thread take 0.6-1.1 ms either way. The passes: min, max (done by the caller), sum, sum of squares
    (einsum: one thread, no BLAS thread pool), a second centred pass only when the mean dominates, `x == 0`.
    """
    n = a.size
    scale = _pow2_scale(mn, mx)
    a_s = a if scale == 1.0 else a * a.dtype.type(1.0 / scale)
    # einsum sums pairwise like ndarray.sum (same rounding here) but ~3x faster on float32.
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
    vec = np.empty(HEAD + bins + N_EXP)
    vec[:HEAD] = (float(n), mean_s * scale, m2_s * scale * scale, mn, mx, float(zeros))
    sample_s = sample if scale == 1.0 else sample * sample.dtype.type(1.0 / scale)
    lo_s, span_s = np.array([mn / scale]), np.array([(mx - mn) / scale])
    vec[HEAD:] = _bin_rows(sample_s[None], _as_float32(sample)[None], lo_s, span_s, bins)[0]
    vec[HEAD + bins] -= sample_zeros  # zeros share biased exponent 0 with the subnormals; zero_count covers them
    return torch.from_numpy(vec)


def _stats_estimated(a: np.ndarray, bins: int, sample_n: int) -> torch.Tensor | None:
    """The CPU path for large tensors when estimates are allowed (`exact=False`): one pass over every element,
    the rest from the fixed sample of `sample_n` elements. None if a value is not finite (the caller then takes
    the exact path, so non-finite counts and the layer where they first appear are always exact).

    Exact: count, non-finite count and mean (the one pass: a sum, which NaN and Inf propagate through; a sum that
    overflows also sends the tensor to the exact path). Estimated from the sample (`_estimate_rows`): the variance
    (about the exact mean, so unbiased), min, max, zero count (scaled up) and both histograms. Five passes over every
    element become one. Inside a recorded step the recorder does the same in two halves: the pass and the copy of
    the sample in the hook, the sample's statistics for all tensors at once when the step ends (`StepBatch`).
    """
    n = a.size
    total = _one_pass_sum(torch.from_numpy(a))
    if not math.isfinite(total):
        return None
    sample = a.take(_SAMPLES.get_numpy(n, sample_n))
    return torch.from_numpy(_estimate_rows(sample[None], np.array([float(n)]), np.array([total / n]), bins)[0])


def _one_pass_sum(flat: torch.Tensor) -> float:
    """The sum of a large CPU tensor: the one pass over every element of the estimated path (an overflow, a NaN or
    an Inf reads as a non-finite sum, with no floating-point warning).

    Unlike the dozens of small ops of a tensor's statistics (see `_stats_fast`), this one op is worth torch's
    threads: measured in a recorded CNN step on 2 cores, 1.7 ms for its 60 large tensors, against 2.3-3.2 ms for
    `np.einsum` on the calling thread."""
    return float(flat.sum())


def _estimate_rows(samples: np.ndarray, n: np.ndarray, mean: np.ndarray, bins: int) -> np.ndarray:
    """Vectors (the layout of `tensor_stats`) of K large tensors from their samples, one row each.

    `samples` [K, m] holds finite float32 or float64 values (left as they are); `n` [K] are the tensors' element
    counts and `mean` [K] their exact means, from the one pass over every element. Estimated from the sample: the
    variance about the exact mean (times n: m2), min, max, the zero count (scaled to n) and both histograms. Rows
    are independent: each row's numbers are what a batch of that row alone gives.
    """
    k, m = samples.shape
    mn, mx = samples.min(axis=1), samples.max(axis=1)
    # Booleans summed as uint8 into uint16 (exact below 65536 per row): 4x faster than count_nonzero along an axis.
    zeros = np.add.reduce((samples == 0).view(np.uint8), axis=1, dtype=np.uint16 if m < 65536 else np.int64)
    # As in _stats_fast: rows whose largest magnitude is outside 2**-40 .. 2**40 are divided by an exact power of two
    # first, so that neither the squares nor `x - min` and `bins / span` overflow or underflow.
    mn_s, mx_s, mean_s = mn.astype(np.float64), mx.astype(np.float64), mean.astype(np.float64)
    e = np.clip(np.frexp(np.maximum(-mn_s, mx_s))[1], -100, 100)
    scale = np.where(np.abs(e) > _SAFE_EXP, np.ldexp(1.0, e), 1.0)
    samples_s = samples
    odd = scale != 1.0
    if odd.any():
        inv = 1.0 / scale[odd]
        samples_s = samples.copy()
        samples_s[odd] *= inv[:, None].astype(samples.dtype)
        mn_s[odd] *= inv
        mx_s[odd] *= inv
        mean_s[odd] *= inv
    work = samples_s - mean_s[:, None].astype(samples.dtype)
    work *= work
    m2_s = work.sum(axis=1)  # pairwise along each row
    counts = _bin_rows(samples_s, _as_float32(samples), mn_s, mx_s - mn_s, bins, out=work)
    out = np.empty((k, HEAD + bins + N_EXP))
    out[:, 0] = n
    out[:, 1] = mean
    out[:, 2] = m2_s * scale * scale * (n / m)
    out[:, 3] = mn
    out[:, 4] = mx
    out[:, 5] = np.rint(zeros * n / m)
    out[:, HEAD:] = counts
    # Zeros have biased exponent 0 like subnormals, but zero_count covers them: take the sample's zeros back out.
    out[:, HEAD + bins] -= zeros
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
) -> np.ndarray:
    """The linear and exponent histograms of each row, [K, bins + N_EXP] counts (exponent bin 0 still holds the
    zeros, which share it with the subnormals).

    `samples_s` [K, m]: finite values in the scaled space of their row (where neither `x - lo` nor `bins / span`
    overflows), binned linearly between `lo_s` and `lo_s + span_s` in their own dtype (a constant row lands in bin
    0); `s32`: the same values unscaled, as float32, binned by exponent from their bits; `out`: scratch of the shape
    and dtype of `samples_s` (it is not written to otherwise).
    """
    k = samples_s.shape[0]
    dtype = samples_s.dtype
    factor = np.divide(bins, span_s, out=np.zeros_like(span_s), where=span_s > 0).astype(dtype)
    lin = np.subtract(samples_s, lo_s.astype(dtype)[:, None], out=out)
    lin *= factor[:, None]
    offsets = np.arange(k, dtype=np.int32)[:, None] * _row_width(bins)
    return _count_bins(lin, s32, offsets, k, bins)


def _row_width(bins: int) -> int:
    """A row of `_count_bins`: its linear bins, its exponent bins and the exponent-255 bin (Inf/NaN; never hit)."""
    return bins + N_EXP + 1


def _count_bins(lin: np.ndarray, s32: np.ndarray, offsets: np.ndarray, rows: int, bins: int) -> np.ndarray:
    """[rows, bins + N_EXP] counts of the values whose linear positions are `lin` (>= 0, in bins; floored here) and
    whose float32 bits are `s32`, each value's two bins offset into its own row by `offsets` (a row is
    `_row_width(bins)` wide; `offsets` broadcasts against `lin`, whose last axis holds the values).

    Every value's two bins are counted by one bincount: int32 keys are half the bytes of intp, and torch.bincount
    takes them as they are (2.6x faster for a step's samples than np.bincount, which converts them to intp first).
    `lin` may be overwritten.
    """
    m = lin.shape[-1]
    keys = np.empty((*lin.shape[:-1], 2 * m), dtype=np.int32)
    expo = keys[..., m:]
    np.bitwise_and(s32.view(np.int32), 0x7FFFFFFF, out=expo)
    np.right_shift(expo, 23, out=expo)
    expo += offsets + bins
    # lin >= 0 already (every value is >= its row's low end, and rounding is monotonic); only the maximum can round
    # up to `bins`.
    np.minimum(lin, lin.dtype.type(bins - 1), out=lin)
    np.copyto(keys[..., :m], lin, casting="unsafe")  # truncation of values >= 0: the floor
    keys[..., :m] += offsets
    width = _row_width(bins)
    counts = torch.bincount(torch.from_numpy(keys).reshape(-1), minlength=rows * width).numpy()
    return counts.reshape(rows, width)[:, : bins + N_EXP]


class StepBatch:
    """The tensors of a recorded step that are measured together when it ends, on the CPU.

    A transformer or a CNN has dozens of tensors per recorded step, and measured one by one each costs ~30 numpy
    calls: far more than their arithmetic (several microseconds a call with the caches cold inside a training step).
    Here a tensor costs a copy when it is seen (it may change in place afterwards), and `finish()` makes ~20 numpy
    calls for each of the two kinds, however many tensors there are:

    * small tensors (1..sample_cap elements, float16/bfloat16/float32: biases, norm weights, small weights and their
      gradients): exact statistics from a float32 copy, by segment reductions (`reduceat`) and one `bincount`. Sums
      are float64 over float32 values, so no scaling is needed.
    * with `estimate=True` (`watch(exact=False)`), large float32 tensors: the one pass over every element (a sum:
      count, exact mean, non-finite detection) runs in `take()`, which copies the tensor's sample; the rest is
      estimated from the samples of all of them at once (`_estimate_rows`, as `_stats_estimated` for one tensor).

    A tensor with a non-finite value (or a float64 tensor, whose values can exceed float32's range) is not taken:
    the caller measures it alone, with the same result as before.
    """

    def __init__(self, bins: int, sample_cap: int) -> None:
        self.bins = bins
        self.sample_cap = sample_cap
        self.items: dict[Any, np.ndarray] = {}  # small tensors: a float32 copy
        self.large: dict[Any, tuple[int, float, int]] = {}  # large tensors: (numel, exact mean, row of _rows)
        self._rows: np.ndarray | None = None  # the samples of the large ones, kept across steps (no page faults)
        self._used = 0

    def take(self, key: Any, x: torch.Tensor, estimate: bool = False) -> StatsMeta | None:
        """Keep what `finish()` needs of `x` if it qualifies (see the class docstring); None otherwise."""
        if x.device.type != "cpu":
            return None
        n = x.numel()
        if n > self.sample_cap:
            return self._take_large(key, x, n) if estimate and x.dtype == torch.float32 else None
        if n == 0 or x.dtype not in _BATCH_DTYPES:
            return None
        flat = x.detach().reshape(-1)
        try:  # a copy: the tensor may change in place before the step ends
            a = flat.numpy().copy() if flat.dtype == torch.float32 else flat.to(torch.float32).numpy()
        except RuntimeError:  # a tensor numpy cannot view (e.g. a lazy negation bit)
            return None
        self.discard(key)
        self.items[key] = a
        return StatsMeta(numel=n, bins=self.bins, sample_n=n)

    def _take_large(self, key: Any, x: torch.Tensor, n: int) -> StatsMeta | None:
        flat = x.detach().reshape(-1)
        a = numpy_view(flat)
        if a is None:
            return None
        total = _one_pass_sum(flat)
        if not math.isfinite(total):  # a NaN or Inf, or a sum beyond float32: the exact per-tensor path counts them
            return None
        cap = self.sample_cap
        self.discard(key)
        rows = self._rows
        if rows is None or self._used == rows.shape[0]:
            grown = np.empty((max(8, 2 * self._used), cap), dtype=np.float32)
            if rows is not None:
                grown[: self._used] = rows[: self._used]
            self._rows = rows = grown
        np.take(a, _SAMPLES.get_numpy(n, cap), out=rows[self._used])
        self.large[key] = (n, total / n, self._used)
        self._used += 1
        return StatsMeta(numel=n, bins=self.bins, sample_n=cap, estimated=True)

    def discard(self, key: Any) -> None:
        self.items.pop(key, None)
        self.large.pop(key, None)  # its row stays used until the step ends

    def keys(self) -> list[Any]:
        return [*self.items, *self.large]

    def clear(self) -> None:
        """Forget the step's tensors (the buffer of samples is kept for the next step)."""
        self.items = {}
        self.large = {}
        self._used = 0

    def release(self) -> None:
        """`clear()`, and give the buffer of samples back (when recording stops)."""
        self.clear()
        self._rows = None

    def __contains__(self, key: Any) -> bool:
        return key in self.items or key in self.large

    def __len__(self) -> int:
        return len(self.items) + len(self.large)

    def finish(self) -> dict[Any, tuple[torch.Tensor, StatsMeta]]:
        """The vectors of every kept tensor (the layout of `tensor_stats`), keyed as given; the batch is emptied."""
        items, large, used = self.items, self.large, self._used
        self.clear()
        out: dict[Any, tuple[torch.Tensor, StatsMeta]] = {}
        if large:
            assert self._rows is not None
            keys = list(large)
            n, mean, row = (np.array(v) for v in zip(*large.values(), strict=True))
            samples = self._rows[:used] if len(row) == used else self._rows[row]  # rows of discarded keys left out
            vecs = _estimate_rows(samples, n.astype(np.float64), mean, self.bins)
            cap = samples.shape[1]
            for i, key in enumerate(keys):
                meta = StatsMeta(numel=int(n[i]), bins=self.bins, sample_n=cap, estimated=True)
                out[key] = (torch.from_numpy(vecs[i]), meta)
        if items:
            out.update(self._finish_small(items))
        return out

    def _finish_small(self, items: dict[Any, np.ndarray]) -> dict[Any, tuple[torch.Tensor, StatsMeta]]:
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
                key: tensor_stats(torch.from_numpy(a), bins=bins, sample_cap=self.sample_cap)
                for (key, a), ok in zip(items.items(), finite, strict=True)
                if not ok
            }
            good = {key: a for (key, a), ok in zip(items.items(), finite, strict=True) if ok}
            return {**alone, **self._finish_small(good)} if good else alone
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
        vecs = np.empty((count, HEAD + bins + N_EXP))
        vecs[:, 0], vecs[:, 1], vecs[:, 2], vecs[:, 3], vecs[:, 4], vecs[:, 5] = n, mean, m2, mn, mx, zeros
        vecs[:, HEAD:] = _count_bins(lin, c32, seg, count, bins)
        vecs[:, HEAD + bins] -= zeros  # zeros share biased exponent 0 with the subnormals; zero_count covers them
        metas: dict[int, StatsMeta] = {}  # one per size: they are immutable
        out: dict[Any, tuple[torch.Tensor, StatsMeta]] = {}
        for key, a, vec in zip(items, arrays, torch.from_numpy(vecs).unbind(0), strict=True):
            meta = metas.get(a.size)
            if meta is None:
                meta = metas[a.size] = StatsMeta(numel=a.size, bins=bins, sample_n=a.size)
            out[key] = (vec, meta)
        return out


_BATCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fill_row(row: torch.Tensor, flat: torch.Tensor, idx: torch.Tensor | None) -> None:
    """Write 1-D `flat` (whole, or its elements at `idx`) into the start of float32 `row`, by device ops only."""
    if idx is None:
        row[: flat.numel()].copy_(flat)
    elif flat.dtype == torch.float32:
        torch.index_select(flat, 0, idx, out=row)
    else:
        row.copy_(flat.index_select(0, idx))


class RowStore:
    """Buffers of rows on one device, kept from step to step: row k of every buffer belongs to the k-th item taken
    in the step. Each buffer is given as (width, dtype, value its rows are reset to); rows are reset when the step's
    items are cleared, so that each step starts from clean rows without allocating."""

    def __init__(self, *buffers: tuple[int, torch.dtype, float]) -> None:
        self._specs = buffers
        self.buffers: list[torch.Tensor] = []
        self.used = 0

    @property
    def device(self) -> torch.device | None:
        return self.buffers[0].device if self.buffers else None

    def next_row(self, device: torch.device) -> int:
        """A fresh row's index in every buffer (the buffers are doubled when full)."""
        if not self.buffers or self.used == self.buffers[0].shape[0]:
            size = max(16, 2 * self.used)
            grown = [torch.full((size, w), fill, dtype=dtype, device=device) for w, dtype, fill in self._specs]
            for new, old in zip(grown, self.buffers, strict=False):
                new[: self.used] = old[: self.used]
            self.buffers = grown
        self.used += 1
        return self.used - 1

    def in_use(self) -> list[torch.Tensor]:
        return [b[: self.used] for b in self.buffers]

    def clear(self) -> None:
        if self.used:
            for b, (_, _, fill) in zip(self.buffers, self._specs, strict=True):
                b[: self.used].fill_(fill)
        self.used = 0

    def release(self) -> None:
        self.clear()
        self.buffers = []


class RowBatch:
    """What a step keeps in a `RowStore`, by key: `kept[key] = (row, ...)`. Emptied (and the rows reset) by
    `clear()` at the end of each step; `release()` also gives the buffers back."""

    def __init__(self, store: RowStore) -> None:
        self.kept: dict[Any, tuple[Any, ...]] = {}
        self._store = store

    def discard(self, key: Any) -> None:
        self.kept.pop(key, None)  # its row stays used until the step ends

    def keys(self) -> list[Any]:
        return list(self.kept)

    def clear(self) -> None:
        """Forget the step's items; their rows are reset for the next step (the buffers are kept)."""
        self._store.clear()
        self.kept = {}

    def release(self) -> None:
        """`clear()`, and give the buffers back (when recording stops)."""
        self.kept = {}
        self._store.release()

    def __contains__(self, key: Any) -> bool:
        return key in self.kept

    def __len__(self) -> int:
        return len(self.kept)


class DeviceBatch(RowBatch):
    """`StepBatch` for the device path (CUDA's): a recorded step's tensors measured together when it ends, with one
    set of ops for all of them, where `tensor_stats` makes ~75 kernel launches per tensor (a recorded step of GPT-2
    small measures ~470 tensors: the launches, not the arithmetic, would set its cost). Nothing is read back.

    Every kept tensor is a row of `sample_cap` float32 values on its device. A tensor of at most that many elements
    is copied in whole; the rest of its row stays NaN, which every statistic leaves out as it leaves out the tensor's
    own non-finite values (their count comes from numel), so its statistics are exact. A larger one (only with
    `estimate`, i.e. `exact=False`) gets its fixed sample in the row, and, from every element in the hook, its
    finite count and their sum (as `_stats_estimated_masked`); its spread, extremes, zeros and histograms are then
    estimated from the sample. Rows are reset to NaN when the step ends and kept for the next one. float64 tensors,
    and tensors on another device than the batch's first, are left to `tensor_stats`.
    """

    def __init__(self, bins: int, sample_cap: int) -> None:
        # kept: key -> (row, meta). The rows, and per row: the finite count, their sum, and 1 for a large tensor.
        super().__init__(RowStore((sample_cap, torch.float32, math.nan), (3, torch.float64, 0.0)))
        self.bins = bins
        self.sample_cap = sample_cap
        self._metas: dict[tuple[int, bool], StatsMeta] = {}

    def take(self, key: Any, x: torch.Tensor, estimate: bool = False) -> StatsMeta | None:
        """Keep what `finish()` needs of `x` if it qualifies (see the class docstring); None otherwise."""
        n = x.numel()
        large = n > self.sample_cap
        device = self._store.device
        if n == 0 or x.dtype not in _BATCH_DTYPES or (large and not estimate) or device not in (None, x.device):
            return None
        self.discard(key)
        k = self._store.next_row(x.device)
        rows, exact = self._store.buffers
        flat = x.detach().reshape(-1)
        if large:
            dev = flat.device.type
            # As in tensor_stats: autocast (on in forward hooks) would cast a half tensor to float32 before the sum.
            with torch.autocast(device_type=dev, enabled=False) if _autocast_on(dev) else contextlib.nullcontext():
                zeroed = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
                exact[k, 0].copy_((zeroed == flat).sum())
                exact[k, 1].copy_(zeroed.sum(dtype=torch.float32))
            exact[k, 2].fill_(1.0)
            del zeroed
        # A copy (the tensor may change in place before the step ends): the whole tensor, or its sample.
        fill_row(rows[k], flat, _SAMPLES.get(n, self.sample_cap, flat.device) if large else None)
        meta = self._metas.get((n, large))
        if meta is None:
            sample_n = self.sample_cap if large else n
            meta = self._metas[(n, large)] = StatsMeta(numel=n, bins=self.bins, sample_n=sample_n, estimated=large)
        self.kept[key] = (k, meta)
        return meta

    def finish(self) -> dict[Any, tuple[torch.Tensor, StatsMeta]]:
        """The vectors of every kept tensor (the layout of `tensor_stats`, rows of one device tensor), keyed as
        given; the batch is emptied. Every used row is measured (those of discarded keys too: selecting the kept
        ones on the device would need an index copied from the host)."""
        kept = self.kept
        out: dict[Any, tuple[torch.Tensor, StatsMeta]] = {}
        if kept:
            rows, exact = self._store.in_use()
            vecs = _rows_stats(rows, exact, self.bins)
            out = {key: (vecs[k], meta) for key, (k, meta) in kept.items()}
        self.clear()
        return out


def _rows_stats(rows: torch.Tensor, exact: torch.Tensor, bins: int) -> torch.Tensor:
    """[K, HEAD + bins + N_EXP] vectors of `DeviceBatch` rows: `_stats_masked` along each row, with the finite
    count and mean of a large tensor's row (`exact[k] = [count, sum, 1]`) taken from every element of it, the row
    being its sample, which stands for its finite values (scaled up to their count). Device ops only."""
    fin = rows.abs() < math.inf
    m_s = fin.sum(1)
    mn = torch.where(fin, rows, math.inf).amin(1)
    mx = torch.where(fin, rows, -math.inf).amax(1)
    e = torch.frexp(torch.maximum(mn.neg(), mx)).exponent.clamp_(-100, 100)
    sc = torch.pow(2.0, e.to(torch.float64))  # exact powers of two; see _stats_masked
    inv = sc.reciprocal().to(rows.dtype)
    xs = torch.where(fin, rows * inv[:, None], 0.0)
    m_s64 = m_s.to(torch.float64)
    row_mean = xs.sum(1) * sc / m_s64.clamp(min=1)
    large = exact[:, 2] > 0
    count = torch.where(large, exact[:, 0], m_s64)
    exact_mean = exact[:, 1] / count.clamp(min=1)
    # A large tensor's mean from every element, unless its float32 sum overflowed; a small one's from its row.
    mean = torch.where(large & (exact_mean.abs() < math.inf), exact_mean, row_mean)
    d = torch.where(fin, xs - (mean * inv).to(rows.dtype)[:, None], 0.0)
    zeros = (rows == 0).sum(1)
    scale = torch.where(large, count / m_s64.clamp(min=1), 1.0)
    m2 = (d * d).sum(1) * sc * sc * scale
    head = torch.stack([count, mean, m2, mn.to(torch.float64), mx.to(torch.float64), zeros * scale], dim=1)
    return torch.cat([head, _masked_counts(rows, fin, zeros, mn, mx, inv, bins)], dim=1)


_NUMPY_FLOATS = (torch.float32, torch.float64)


def numpy_view(flat: torch.Tensor) -> np.ndarray | None:
    """`flat` as a numpy array sharing its memory: CPU float32/float64 only; None for anything else (other dtypes,
    other devices, a tensor numpy cannot view such as one with a lazy negation bit)."""
    if flat.device.type != "cpu" or flat.dtype not in _NUMPY_FLOATS:
        return None
    try:
        return flat.numpy()
    except RuntimeError:
        return None


def segments(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, start offsets) of `arrays` laid end to end: the `indices` of np.ufunc.reduceat over their
    concatenation (every array must be non-empty)."""
    lens = np.fromiter((a.size for a in arrays), dtype=np.intp, count=len(arrays))
    starts = np.zeros(len(arrays), dtype=np.intp)
    np.cumsum(lens[:-1], out=starts[1:])
    return lens, starts


def _stats_masked(xf: torch.Tensor, bins: int, sample_n: int, sample_cap: int) -> torch.Tensor:
    """Branch-free statistics over the finite values only; nothing is read back to the host (the CUDA path).

    Every op here is a kernel launch on a GPU, so the count is kept low (see bench/bench_kernel.py): finiteness is
    one compare on |x| (NaN < inf is False), the power-of-two scale comes from frexp of the largest finite
    magnitude, and the exponent histogram needs no mask (zeros are taken back out of the subnormal bin, Inf/NaN
    have biased exponent 255, which is the trash bin).
    """
    n = xf.numel()
    absx = xf.abs()
    fin = absx < math.inf
    count = fin.sum()
    mn = torch.where(fin, xf, math.inf).amin()
    mx = torch.where(fin, xf, -math.inf).amax()
    # With no finite value mn=inf, mx=-inf: e is then clamped nonsense, but every later use is masked by `fin`.
    e = torch.frexp(torch.maximum(mn.neg(), mx)).exponent.clamp_(-100, 100)
    inv = torch.pow(2.0, e.neg()).to(xf.dtype)  # exact: a power of two
    xs = torch.where(fin, xf * inv, 0.0)
    mean_s = xs.sum() / count.clamp(min=1)
    d = torch.where(fin, xs - mean_s, 0.0)
    m2_s = torch.dot(d, d)
    zeros = (xf == 0).sum()
    sc = torch.pow(2.0, e.to(torch.float64))
    head = torch.stack(
        [count.to(torch.float64), mean_s * sc, m2_s * sc * sc, mn.to(torch.float64), mx.to(torch.float64), zeros]
    ).to(torch.float64)

    if sample_n == n:
        sample, fin_s, sample_zeros = xf, fin, zeros
    else:
        idx = _SAMPLES.get(n, sample_cap, xf.device)
        sample, fin_s = xf.index_select(0, idx), fin.index_select(0, idx)
        sample_zeros = (sample == 0).sum()
    counts = _masked_counts(sample[None], fin_s[None], sample_zeros[None], mn[None], mx[None], inv[None], bins)
    return torch.cat([head, counts[0]])


def _masked_counts(
    rows: torch.Tensor,
    fin: torch.Tensor,
    zeros: torch.Tensor,
    mn: torch.Tensor,
    mx: torch.Tensor,
    inv: torch.Tensor,
    bins: int,
) -> torch.Tensor:
    """Both histograms of the finite values of each row of `rows` [K, m] (mask `fin`, `zeros[k]` of row k's values
    0), device ops only: linear bins between the row's `mn` and `mx` and exponent bins, as [K, bins + N_EXP] float64
    counts. `inv` [K] is the power of two that brings each row's largest finite magnitude near 1 (`_stats_masked`)."""
    k_rows = rows.shape[0]
    trash, width = bins + N_EXP, bins + N_EXP + 1
    # Linear bins between min and max, in the scaled space where `x - min` and `bins / span` cannot overflow (a
    # non-constant span there is >= 2**-49). A constant tensor lands in bin 0; the host places it.
    lo_s = mn * inv
    k = bins / (mx * inv - lo_s).clamp(min=1e-30)
    lin = ((rows * inv[:, None] - lo_s[:, None]) * k[:, None]).clamp_(0, bins - 1).floor_()
    lin = torch.where(fin, lin, float(trash))
    r32 = rows if rows.dtype == torch.float32 else rows.to(torch.float32)  # exponents from float32 bits
    expo = torch.bitwise_right_shift(r32.abs().view(torch.int32), 23).to(lin.dtype) + bins
    keys = torch.cat([lin, expo], dim=1)
    if k_rows > 1:  # both histograms of every row in one count: each row's bins in a block of its own
        keys += (torch.arange(k_rows, device=rows.device, dtype=keys.dtype) * width)[:, None]
    counts = _bin_counts(keys.reshape(-1), k_rows * width).view(k_rows, width)[:, :trash]
    counts[:, bins] -= zeros.to(torch.float64)  # zeros share biased exponent 0 with the subnormals
    return counts


def _stats_estimated_masked(flat: torch.Tensor, wd: torch.dtype, bins: int, sample_n: int) -> torch.Tensor:
    """`_stats_estimated` on the device path (CUDA's): no read-back, so no branch on what the tensor holds.

    Exact, from every element: the finite count and their sum. `nan_to_num` writes the tensor once with its
    non-finite values zeroed; the elements it left equal to the input are the finite ones (NaN equals nothing, an
    Inf was changed), and its sum is theirs (in float32 for a half-precision tensor, with no copy of it): four
    kernels moving ~22 bytes per float32 element (12 per bf16/fp16 one), where the exact masked path moves ~90.
    Estimated from the sample's finite values, as `_estimate_rows` does: min, max, both histograms, the zero count
    and the variance about the exact mean, both scaled from the sample's finite values to the tensor's. The sample
    is measured as a one-row `DeviceBatch` would measure it (`_rows_stats`); inside a recorded step tensors go
    through `DeviceBatch` itself, which measures all of a step's rows with one set of ops.

    The mean falls back on the sample's when the float32 sum of the finite values overflows (values near float32's
    largest). A sample without a finite value, in a tensor with some, leaves min > max: `decode_many` then gives the
    spread, extremes and histogram of a point at the mean.
    """
    n = flat.numel()
    zeroed = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    count = (zeroed == flat).sum().to(torch.float64)
    total = zeroed.sum(dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32).to(torch.float64)
    del zeroed
    sample = flat.index_select(0, _SAMPLES.get(n, sample_n, flat.device))
    if sample.dtype != wd:
        sample = sample.to(wd)
    exact = torch.stack([count, total, torch.ones_like(count)])  # as a large row of DeviceBatch
    return _rows_stats(sample[None], exact[None], bins)[0]


def _bin_counts(idx: torch.Tensor, total: int) -> torch.Tensor:
    """Counts of each integer value (held in a float tensor) in [0, total) as float64, with no host synchronisation
    on CUDA: there `bincount` reads its maximum back to size its output, `histc` with constant bounds does not
    (its float32 counts are exact below 2**24, far above any sample cap)."""
    if idx.device.type == "cpu":
        return torch.bincount(idx.to(torch.int32), minlength=total)[:total].to(torch.float64)
    return torch.histc(idx.to(torch.float32), bins=total, min=-0.5, max=total - 0.5).to(torch.float64)


def decode_tensor_stats(vec: np.ndarray, meta: StatsMeta) -> TensorStats:
    """Turn one vector from `tensor_stats` (read back to the host) into a TensorStats."""
    return decode_many([vec], [meta])[0]


def decode_many(vecs: Sequence[np.ndarray], metas: Sequence[StatsMeta]) -> list[TensorStats]:
    """`decode_tensor_stats` for a whole step at once: the vectors are stacked and every conversion is one numpy
    call over all of them, not one per tensor (a recorded step of a model with a hundred layers decodes several
    hundred vectors). The histograms keep their counts in the step's arrays until they are read."""
    if not vecs:
        return []
    by_bins: dict[int, list[int]] = {}
    for i, meta in enumerate(metas):
        by_bins.setdefault(meta.bins, []).append(i)
    out: list[TensorStats | None] = [None] * len(vecs)
    for bins, rows in by_bins.items():
        block = np.stack([np.asarray(vecs[i], dtype=np.float64)[: vector_length(bins)] for i in rows])
        heads = block[:, :HEAD]
        counts_i = np.rint(heads[:, 0])
        head_l = heads.tolist()
        # Both histograms of every row stay in two integer arrays; each Histogram reads its row into a tuple only
        # when something reads it (most of a long run's are never read one by one, see records._Counts).
        lin_i = np.rint(block[:, HEAD : HEAD + bins]).astype(np.int64)
        exp_i = np.rint(block[:, HEAD + bins :]).astype(np.int64)
        for j, i in enumerate(rows):
            meta = metas[i]
            sampled = meta.sampled
            count = int(counts_i[j])
            _, mean, m2, lo, hi, zeros = head_l[j]
            if count == 0:
                mean = m2 = lo = hi = math.nan
                hist = Histogram(edges=(0.0, 1.0), counts=(0,), sampled=sampled)
            elif hi > lo:
                hist = Histogram._even(lin_i, j, lo, hi, sampled)
            else:  # a constant tensor: one bin of width 1 centred on its value
                if lo > hi:  # estimated on a device from a sample with no finite value: a point at the mean
                    lo = hi = mean
                hist = Histogram(edges=(lo - 0.5, lo + 0.5), counts=(int(lin_i[j].sum()),), sampled=sampled)
            out[i] = TensorStats(
                numel=meta.numel,
                count=count,
                mean=mean,
                m2=max(m2, 0.0) if count else math.nan,
                min=lo,
                max=hi,
                zero_count=int(round(zeros)),
                histogram=hist,
                exponents=ExponentHistogram._defer(exp_i, j, sampled),
                estimated=meta.estimated,
            )
    return [s for s in out if s is not None]


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


def unit_activity(
    y: torch.Tensor, unit_dim: int, ever_active: torch.Tensor, rare_below: float, *, sync_free: bool | None = None
) -> torch.Tensor:
    """[dead, rare, never] unit counts for a ReLU-family output, on y's device; updates `ever_active` in place.
    `sync_free` as in `tensor_stats`: True keeps to device ops (the CUDA path) even on the CPU.

    dead: units with no positive output for any sample of this call; rare: units positive for fewer than
    `rare_below` of their samples; never: units not positive in any recorded call so far.
    """
    yd = y.detach()
    per_unit = yd.shape[unit_dim]
    samples = yd.numel() // max(per_unit, 1)
    if not sync_free and yd.device.type == "cpu" and yd.dtype in _NUMPY_FLOATS and ever_active.device.type == "cpu":
        # On the CPU in numpy, one thread, no OpenMP fork/join (see _stats_fast); autocast does not reach numpy. The
        # booleans are viewed as uint8 and summed into uint16 where no count can reach 65536: 2x faster than a sum
        # into int32 over all the other dimensions at once. [before, units, after]: a conv output sums H*W first.
        pos = (yd.numpy() > 0).view(np.uint8).reshape(math.prod(yd.shape[:unit_dim]), per_unit, -1)
        before, _, after = pos.shape
        if after > 1:
            part = np.add.reduce(pos, axis=2, dtype=np.uint16 if after < 65536 else np.int64)
            active_np = part.sum(axis=0, dtype=np.int64)
        else:
            active_np = np.add.reduce(pos[:, :, 0], axis=0, dtype=np.uint16 if before < 65536 else np.int64)
        alive_np = active_np > 0
        ever_np = ever_active.numpy()  # the same memory: updated in place
        np.logical_or(ever_np, alive_np, out=ever_np)
        counts = (
            alive_np.size - np.count_nonzero(alive_np),
            np.count_nonzero(active_np < rare_below * samples),
            ever_np.size - np.count_nonzero(ever_np),
        )
        return torch.from_numpy(np.array(counts, dtype=np.float64))
    with torch.autocast(device_type=y.device.type, enabled=False):
        dims = [d for d in range(y.dim()) if d != unit_dim]
        if yd.is_floating_point() and samples < 2**24:
            # Summing (y > 0) over dimensions reduces booleans ~4x slower than sign(y).clamp(0) summed in float32
            # (exact: sums of ones below 2**24). A NaN makes its unit's count NaN, which then reads as not active.
            active = yd.sign().clamp_(min=0).sum(dim=dims, dtype=torch.float32)
        else:
            active = (yd > 0).sum(dim=dims)
        alive = active > 0
        ever_active.logical_or_(alive)
        dead = (~alive).sum()
        rare = (active < rare_below * samples).sum()
        never = (~ever_active).sum()
        return torch.stack([dead, rare, never]).to(torch.float64)


def saturation_count(
    y: torch.Tensor, lo: float, hi: float, tol: float, *, sync_free: bool | None = None
) -> torch.Tensor:
    """Number of elements within `tol` of either bound, as a 1-element float64 tensor on y's device."""
    with torch.autocast(device_type=y.device.type, enabled=False):
        yd = y.detach()
        mid = (lo + hi) / 2
        half = (hi - lo) / 2
        # On the CPU in numpy, as in _stats_fast.
        if not sync_free and yd.device.type == "cpu" and yd.dtype in _NUMPY_FLOATS:
            a = yd.numpy()
            t = a.dtype.type
            return torch.tensor([float(np.count_nonzero(np.abs(a - t(mid)) >= t(half - tol)))], dtype=torch.float64)
        n = ((yd - mid).abs() >= half - tol).sum()
        return n.to(torch.float64).reshape(1)
