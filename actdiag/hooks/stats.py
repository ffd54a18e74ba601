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
* the *fast* path assumes every value is finite and skips the masks (fewer passes over memory). On the CPU a
  host read costs nothing extra, so `aminmax` is checked first and the fast path is taken when min and max are
  finite (NaN propagates through min/max, and +-Inf shows as one of them).

Histograms are built from at most `sample_cap` elements: tensors larger than that are sampled with a fixed
pseudo-random index (a private generator, so the user's RNG state is untouched) and the histogram is marked
`sampled`. Moments, min/max, zero and non-finite counts always use every element. Counting into bins uses one
`bincount` on the CPU and one `histc` with constant bounds on CUDA (`bincount` on CUDA reads its maximum back to
size its output, a hidden synchronisation).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from actdiag.records import E_HIGH, E_LOW, ExponentHistogram, Histogram, TensorStats

DEFAULT_BINS = 64
DEFAULT_SAMPLE_CAP = 65536
N_EXP = E_HIGH - E_LOW + 1  # 255 float32 binades: biased exponents 0 (subnormal) .. 254
HEAD = 6  # count, mean, m2, min, max, zero_count


@dataclass(frozen=True, slots=True)
class StatsMeta:
    """What the host knows about a vector without reading it: sizes and layout."""

    numel: int
    bins: int
    sample_n: int  # elements that went into the histograms

    @property
    def length(self) -> int:
        return HEAD + self.bins + N_EXP

    @property
    def sampled(self) -> bool:
        return self.sample_n < self.numel


def vector_length(bins: int) -> int:
    return HEAD + bins + N_EXP


class _SampleIndex:
    """Fixed pseudo-random element indices per (numel, device), from a private generator, LRU-bounded."""

    def __init__(self, max_entries: int = 64) -> None:
        self._cache: OrderedDict[tuple[int, int, str], torch.Tensor] = OrderedDict()
        self._max = max_entries

    def get(self, numel: int, cap: int, device: torch.device) -> torch.Tensor:
        key = (numel, cap, str(device))
        idx = self._cache.get(key)
        if idx is not None:
            self._cache.move_to_end(key)
            return idx
        # Drawn on the target device by a private generator: no host-to-device copy (which would synchronise on
        # CUDA) and the user's RNG streams are not advanced.
        gen = torch.Generator(device=device)
        gen.manual_seed(numel * 1_000_003 + cap)
        idx = torch.randint(0, numel, (cap,), generator=gen, device=device).sort().values
        self._cache[key] = idx
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return idx


_SAMPLES = _SampleIndex()


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    if x.dtype == torch.float64 or x.dtype in (torch.int64, torch.int32):
        return torch.float64
    return torch.float32


def _bin_counts(idx: torch.Tensor, total: int) -> torch.Tensor:
    """Counts of each integer in [0, total) as float64, without a host synchronisation on CUDA."""
    if idx.device.type == "cpu":
        return torch.bincount(idx, minlength=total)[:total].to(torch.float64)
    # histc with constant bounds never reads data back; float32 counts are exact below 2**24 (sample_cap is less).
    return torch.histc(idx.to(torch.float32), bins=total, min=-0.5, max=total - 0.5).to(torch.float64)


def _exponent_index(s32: torch.Tensor) -> torch.Tensor:
    """Biased float32 exponent of each element (0 = zero or subnormal, 255 = Inf/NaN), as int64."""
    return torch.bitwise_right_shift(s32.abs().view(torch.int32), 23).to(torch.int64)


def tensor_stats(
    x: torch.Tensor,
    *,
    bins: int = DEFAULT_BINS,
    sample_cap: int = DEFAULT_SAMPLE_CAP,
    sync_free: bool | None = None,
) -> tuple[torch.Tensor, StatsMeta]:
    """Statistics of `x` as a float64 vector on x's device (layout in the module docstring) and its meta.

    `sync_free=None` picks the masked path on CUDA and the fast path on the CPU when all values are finite;
    True forces the masked path (tests use it to check that path on the CPU).
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
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.reshape(-1).to(wd)
        if sync_free is None:
            sync_free = x.device.type != "cpu"
        masked = True
        fin: torch.Tensor | None
        if not sync_free:
            mn, mx = torch.aminmax(xf)
            masked = not (math.isfinite(float(mn)) and math.isfinite(float(mx)))
        if masked:
            head, lo, hi, fin = _moments_masked(xf)
        else:
            head, lo, hi, fin = _moments_fast(xf, mn, mx)
        sample = xf if sample_n == numel else xf[_SAMPLES.get(numel, sample_cap, x.device)]
        counts = _histograms(sample, lo, hi, bins, masked)
    return torch.cat([head, counts]), meta


def _pow2_scale(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1/scale): a power of two near `absmax`, so scaling is exact and neither the sum nor the sum of
    squares can overflow (values ~1e30) or underflow (values ~1e-30) in float32."""
    e = torch.frexp(absmax).exponent.clamp(-100, 100)
    one = torch.ones_like(absmax)
    return torch.ldexp(one, e), torch.ldexp(one, -e)


def _moments_fast(
    xf: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    n = xf.numel()
    scale, inv = _pow2_scale(torch.maximum(mn.abs(), mx.abs()))
    xs = xf * inv
    mean_s = xs.sum() / n
    d = xs.sub_(mean_s)
    m2_s = torch.dot(d, d)
    zeros = n - torch.count_nonzero(xf)
    count = torch.tensor(float(n), dtype=xf.dtype, device=xf.device)
    head = torch.stack([count, mean_s, m2_s, mn, mx, zeros.to(xf.dtype)]).to(torch.float64)
    head[1] *= scale.to(torch.float64)
    head[2] *= scale.to(torch.float64) ** 2
    return head, mn, mx, None


def _moments_masked(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fin = torch.isfinite(xf)
    count = fin.sum().to(xf.dtype)
    zero = torch.zeros((), dtype=xf.dtype, device=xf.device)
    mn = torch.where(fin, xf, math.inf).amin()
    mx = torch.where(fin, xf, -math.inf).amax()
    absmax = torch.where(count > 0, torch.maximum(mn.abs(), mx.abs()), zero)
    scale, inv = _pow2_scale(absmax)
    xs = torch.where(fin, xf * inv, zero)
    mean_s = xs.sum() / count.clamp(min=1)
    d = torch.where(fin, xs - mean_s, zero)
    m2_s = torch.dot(d, d)
    zeros = (xf == 0).sum().to(xf.dtype)
    head = torch.stack([count, mean_s, m2_s, mn, mx, zeros]).to(torch.float64)
    head[1] *= scale.to(torch.float64)
    head[2] *= scale.to(torch.float64) ** 2
    return head, mn, mx, fin


def _histograms(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int, masked: bool) -> torch.Tensor:
    """Linear (bins) and exponent (N_EXP) counts of `sample`, from one bincount over both index sets."""
    trash = bins + N_EXP
    # Linear bins between the tensor's min and max. A constant tensor (span 0) lands in bin 0; the host places it.
    # Bin positions in float64: the sample is small (<= sample_cap), and float32 spans can overflow (-3e38..3e38)
    # or make bins / span overflow (spans near the float32 minimum).
    lo64 = lo.to(torch.float64)
    span64 = hi.to(torch.float64) - lo64
    safe_span = torch.where(span64 > 0, span64, torch.ones_like(span64))
    u = (sample.to(torch.float64) - lo64) / safe_span * bins
    lin = u.clamp_(0, bins - 1).to(torch.int64)
    s32 = sample.to(torch.float32)
    expo = _exponent_index(s32)
    exp_idx = expo + bins
    # Zeros have no exponent (zero_count covers them); Inf/NaN have biased exponent 255.
    bad = (s32 == 0) | (expo == 255)
    exp_idx = torch.where(bad, trash, exp_idx)
    if masked:
        fin = torch.isfinite(sample)
        lin = torch.where(fin, lin, trash)
    counts = _bin_counts(torch.cat([lin, exp_idx]), trash + 1)
    return counts[:trash]


def decode_tensor_stats(vec: np.ndarray, meta: StatsMeta) -> TensorStats:
    """Turn one vector from `tensor_stats` (read back to the host) into a TensorStats."""
    count = int(round(float(vec[0])))
    bins = meta.bins
    lin = vec[HEAD : HEAD + bins]
    exps = vec[HEAD + bins : HEAD + bins + N_EXP]
    if count == 0:
        mean = m2 = mn = mx = math.nan
    else:
        mean, m2, mn, mx = (float(v) for v in vec[1:5])
    zero_count = int(round(float(vec[5])))
    if count == 0:
        edges: tuple[float, ...] = (0.0, 1.0)
        lin_counts: tuple[float, ...] = (0.0,)
    elif mx > mn:
        edges = tuple(float(e) for e in np.linspace(mn, mx, bins + 1))
        lin_counts = tuple(float(c) for c in lin)
    else:
        # A constant tensor: one bin of width 1 centred on its value.
        edges = (mn - 0.5, mn + 0.5)
        lin_counts = (float(lin.sum()),)
    sampled = meta.sampled
    return TensorStats(
        numel=meta.numel,
        count=count,
        mean=mean,
        m2=max(m2, 0.0) if count else math.nan,
        min=mn,
        max=mx,
        zero_count=zero_count,
        histogram=Histogram(edges=edges, counts=lin_counts, sampled=sampled),
        exponents=ExponentHistogram(counts=tuple(float(c) for c in exps), sampled=sampled),
    )


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


def unit_activity(y: torch.Tensor, unit_dim: int, ever_active: torch.Tensor, rare_below: float) -> torch.Tensor:
    """[dead, rare, never] unit counts for a ReLU-family output, on y's device; updates `ever_active` in place.

    dead: units with no positive output for any sample of this call; rare: units positive for fewer than
    `rare_below` of their samples; never: units not positive in any recorded call so far.
    """
    with torch.autocast(device_type=y.device.type, enabled=False):
        dims = [d for d in range(y.dim()) if d != unit_dim]
        per_unit = y.detach().shape[unit_dim]
        samples = y.numel() // max(per_unit, 1)
        active = (y.detach() > 0).sum(dim=dims)
        alive = active > 0
        ever_active.logical_or_(alive)
        dead = (~alive).sum()
        rare = (active < rare_below * samples).sum()
        never = (~ever_active).sum()
        return torch.stack([dead, rare, never]).to(torch.float64)


def saturation_count(y: torch.Tensor, lo: float, hi: float, tol: float) -> torch.Tensor:
    """Number of elements within `tol` of either bound, as a 1-element float64 tensor on y's device."""
    with torch.autocast(device_type=y.device.type, enabled=False):
        yd = y.detach()
        mid = (lo + hi) / 2
        half = (hi - lo) / 2
        n = ((yd - mid).abs() >= half - tol).sum()
        return n.to(torch.float64).reshape(1)
