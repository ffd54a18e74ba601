"""The device path: statistics by device ops only, nothing read back to the host (the path of CUDA tensors).

Branch-free: non-finite values are masked out with `torch.where`, so no op depends on what the tensor holds and
nothing synchronises. Counting into bins uses `histc` with constant bounds on CUDA (`bincount` there reads its
maximum back to size its output, a hidden synchronisation). `exact_stats` reads every element for every statistic;
`estimated_stats` reads every element for the exact count, sum, min and max and takes the spread, the zeros and
the histograms from the fixed sample. `DeviceBatch` measures a step's small tensors (and, when estimating, the
samples of its large ones) with one set of ops when the step ends: the fused Triton kernel's three launches
(`fused.py`) where `fused.fused_available` says so and no row is a large tensor's sample. Every vector has the
layout of `layout.STATS`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from actdiag.hooks import fused
from actdiag.hooks.layout import N_EXP, STATS, StatsMeta
from actdiag.hooks.sampling import _BATCH_DTYPES, _SAMPLES, _autocast_on


def exact_stats(xf: torch.Tensor, bins: int, sample_n: int, sample_cap: int) -> torch.Tensor:
    """Statistics of 1-D `xf` over its finite values, every one read; nothing is read back to the host.

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
        STATS.ordered(
            count=count.to(torch.float64),
            mean=mean_s * sc,
            m2=m2_s * sc * sc,
            min=mn.to(torch.float64),
            max=mx.to(torch.float64),
            zero_count=zeros,
        )
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
    counts. `inv` [K] is the power of two that brings each row's largest finite magnitude near 1 (`exact_stats`)."""
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


def estimated_stats(flat: torch.Tensor, wd: torch.dtype, bins: int, sample_n: int) -> torch.Tensor:
    """Statistics of a large 1-D `flat` when estimates are allowed: no read-back, so no branch on its values.

    Exact, from every element (`_exact_parts`): the finite count, their sum, min and max. Estimated from the
    sample's finite values, as the host path's `_estimate_rows` does: both histograms (between the exact min and
    max), the zero count and the variance about the exact mean, both scaled from the sample's finite values to the
    tensor's. The sample is measured as a one-row `DeviceBatch` would measure it (`_rows_stats`); inside a recorded
    step tensors go through `DeviceBatch` itself, which measures all of a step's rows with one set of ops.

    The mean falls back on the sample's when the float32 sum of the finite values overflows (values near float32's
    largest).
    """
    n = flat.numel()
    exact = torch.stack(_exact_parts(flat, flat.dtype == torch.float64))  # as a large row of DeviceBatch
    sample = flat.index_select(0, _SAMPLES.get(n, sample_n, flat.device))
    if sample.dtype != wd:
        sample = sample.to(wd)
    return _rows_stats(sample[None], exact[None], bins)[0]


# A large row's exact parts in `DeviceBatch` (and in `estimated_stats`): what is read from every element.
_EXACT_PARTS = ("count", "sum", "min", "max", "large")
_COUNT, _SUM, _MIN, _MAX, _LARGE = range(len(_EXACT_PARTS))


def _exact_parts(flat: torch.Tensor, wide: bool) -> list[torch.Tensor]:
    """[finite count, their sum, min, max, 1] of 1-D `flat` as float64 0-d tensors, device ops only (the order of
    `_EXACT_PARTS`). `nan_to_num` writes the tensor once with its non-finite values zeroed; the elements it left
    equal to the input are the finite ones (NaN equals nothing, an Inf was changed), and its sum is theirs (in
    float32 for a half-precision tensor unless `wide`, with no copy of it). With no finite value min is +inf and
    max -inf, as the exact path leaves them."""
    zeroed = torch.nan_to_num(flat, nan=0.0, posinf=0.0, neginf=0.0)
    fin = zeroed == flat
    count = fin.sum().to(torch.float64)
    total = zeroed.sum(dtype=torch.float64 if wide else torch.float32).to(torch.float64)
    del zeroed
    mn = torch.where(fin, flat, math.inf).amin().to(torch.float64)
    mx = torch.where(fin, flat, -math.inf).amax().to(torch.float64)
    return [count, total, mn, mx, torch.ones_like(count)]


def _bin_counts(idx: torch.Tensor, total: int, float64: bool = True) -> torch.Tensor:
    """Counts of each integer value (held in a float or integer tensor) in [0, total) as float64 (or, without
    `float64`, in whatever type counts them, for a caller that copies them into a float64 buffer anyway), with no
    host synchronisation on CUDA: there `bincount` reads its maximum back to size its output, `histc` with constant
    bounds does not (its float32 counts are exact below 2**24, far above any sample cap)."""
    if idx.device.type == "cpu":
        counts = torch.bincount(idx.to(torch.int32), minlength=total)[:total]
    else:
        counts = torch.histc(idx.to(torch.float32), bins=total, min=-0.5, max=total - 0.5)
    return counts.to(torch.float64) if float64 else counts


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
    """`HostBatch` for the device path (CUDA's): a recorded step's tensors measured together when it ends, with one
    set of ops for all of them, where `tensor_stats` makes dozens of kernel launches per tensor (a recorded step of
    a transformer measures hundreds of tensors: the launches, not the arithmetic, would set its cost; see
    bench/count_ops.py). Nothing is read back.

    Every kept tensor is a row of `sample_cap` float32 values on its device. A tensor of at most that many elements
    is copied in whole; the rest of its row stays NaN, which every statistic leaves out as it leaves out the tensor's
    own non-finite values (their count comes from numel), so its statistics are exact. A larger one (only with
    `estimate`, i.e. recording often) gets its fixed sample in the row, and, from every element in the hook, its
    finite count, their sum, min and max (`_exact_parts`); its spread, zeros and histograms are then estimated
    from the sample. Rows are reset to NaN when the step ends and kept for the next one. float64 tensors,
    and tensors on another device than the batch's first, are left to `tensor_stats`.
    """

    def __init__(self, bins: int, sample_cap: int) -> None:
        # kept: key -> (row, meta). The rows, and per row a large tensor's `_EXACT_PARTS` (zeros for a small one).
        super().__init__(RowStore((sample_cap, torch.float32, math.nan), (len(_EXACT_PARTS), torch.float64, 0.0)))
        self.bins = bins
        self.sample_cap = sample_cap
        self._metas: dict[tuple[int, bool], StatsMeta] = {}
        self._large = False  # a row of this step holds a large tensor's sample (the fused kernel does not take it)
        # Large tensors inside `together()`: held until it ends, then measured by one call of the fused kernel.
        self._together = 0
        self._held: dict[Any, tuple[torch.Tensor, StatsMeta]] = {}
        self._measured: dict[Any, tuple[torch.Tensor, StatsMeta]] = {}  # their vectors, until finish()

    def together(self, guard: Callable[..., Any]) -> _Together:
        """A reusable context: large tensors taken inside it (on the exact path, of a dtype the fused kernel takes,
        where it is available) are held, not left to `tensor_stats`, and measured together by one call of the
        fused kernel when the outermost block ends, through `guard(fn, held)` (the recorder's: a failure disables a
        part instead of reaching the user's backward). A parameter's hook takes its weight and its gradient: three
        launches for both instead of three each. Held only within the block, which runs inside one hook: nothing
        changes them in place meanwhile, and no reference outlives it. (A class, not a generator: it is entered in
        every parameter's hook, on the host path too.)"""
        return _Together(self, guard)

    def _measure_held(self, held: dict[Any, tuple[torch.Tensor, StatsMeta]]) -> None:
        by_device: dict[torch.device, list[Any]] = {}
        for key, (x, _) in held.items():
            by_device.setdefault(x.device, []).append(key)
        for keys in by_device.values():
            vecs = fused.fused_vectors([held[key][0] for key in keys], bins=self.bins)
            self._measured.update((key, (vecs[j], held[key][1])) for j, key in enumerate(keys))

    def _hold(self, key: Any, x: torch.Tensor, n: int) -> StatsMeta:
        self.discard(key)
        meta = self._metas.get((n, False))
        if meta is None:  # as tensor_stats gives it for the fused kernel: every element read, nothing sampled
            meta = self._metas[(n, False)] = StatsMeta(numel=n, bins=self.bins, sample_n=n, estimated=False)
        self._held[key] = (x.detach(), meta)
        return meta

    def take(self, key: Any, x: torch.Tensor, estimate: bool = False) -> StatsMeta | None:
        """Keep what `finish()` needs of `x` if it qualifies (see the class docstring and `together()`); None
        otherwise."""
        n = x.numel()
        large = n > self.sample_cap
        device = self._store.device
        if large and not estimate and self._together and fused.fused_supported(x) and fused.fused_available(x.device):
            return self._hold(key, x, n)
        if n == 0 or x.dtype not in _BATCH_DTYPES or (large and not estimate) or device not in (None, x.device):
            return None
        self.discard(key)
        k = self._store.next_row(x.device)
        rows, exact = self._store.buffers
        flat = x.detach().reshape(-1)
        if large:
            self._large = True
            dev = flat.device.type
            # As in tensor_stats: autocast (on in forward hooks) would cast a half tensor to float32 before the sum.
            with torch.autocast(device_type=dev, enabled=False) if _autocast_on(dev) else contextlib.nullcontext():
                torch.stack(_exact_parts(flat, wide=False), out=exact[k])
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
        given; the batch is emptied. The torch path measures every used row (those of discarded keys too: selecting
        the kept ones on the device would need an index copied from the host); the fused kernel takes the kept rows'
        leading elements, the tensors themselves (the same offsets from step to step: its table stays cached)."""
        kept = self.kept
        out, self._measured = self._measured, {}
        if kept:
            rows, exact = self._store.in_use()
            if not self._large and fused.fused_available(rows.device):
                vecs = fused.fused_vectors([rows[k, : meta.numel] for k, meta in kept.values()], bins=self.bins)
                out.update((key, (vecs[j], meta)) for j, (key, (_, meta)) in enumerate(kept.items()))
            else:
                vecs = _rows_stats(rows, exact, self.bins)
                out.update((key, (vecs[k], meta)) for key, (k, meta) in kept.items())
        self.clear()
        return out

    def discard(self, key: Any) -> None:
        super().discard(key)
        self._held.pop(key, None)
        self._measured.pop(key, None)

    def keys(self) -> list[Any]:
        return [*self.kept, *self._held, *self._measured]

    def __contains__(self, key: Any) -> bool:
        return key in self.kept or key in self._held or key in self._measured

    def __len__(self) -> int:
        return len(self.kept) + len(self._held) + len(self._measured)

    def clear(self) -> None:
        super().clear()
        self._large = False
        self._held = {}
        self._measured = {}

    def release(self) -> None:
        super().release()
        self._large = False
        self._held = {}
        self._measured = {}


class _Together:
    """`DeviceBatch.together()`'s context."""

    __slots__ = ("batch", "guard")

    def __init__(self, batch: DeviceBatch, guard: Callable[..., Any]) -> None:
        self.batch = batch
        self.guard = guard

    def __enter__(self) -> None:
        self.batch._together += 1

    def __exit__(self, *exc: object) -> None:
        batch = self.batch
        batch._together -= 1
        if not batch._together and batch._held:
            held, batch._held = batch._held, {}
            self.guard(batch._measure_held, held)


def _rows_stats(rows: torch.Tensor, exact: torch.Tensor, bins: int) -> torch.Tensor:
    """[K, STATS.length(bins)] vectors of `DeviceBatch` rows: `exact_stats` along each row, except for a large
    tensor's row (`exact[k]`: its `_EXACT_PARTS`), whose finite count, mean, min and max come from every element of
    it, the row being its sample, which stands for its finite values (scaled up to their count). Device ops only."""
    fin = rows.abs() < math.inf
    m_s = fin.sum(1)
    large = exact[:, _LARGE] > 0
    # A large tensor's extremes from every element; a small one's from its row, which holds all of it.
    ex_mn, ex_mx = exact[:, _MIN].to(rows.dtype), exact[:, _MAX].to(rows.dtype)
    mn = torch.where(large, ex_mn, torch.where(fin, rows, math.inf).amin(1))
    mx = torch.where(large, ex_mx, torch.where(fin, rows, -math.inf).amax(1))
    e = torch.frexp(torch.maximum(mn.neg(), mx)).exponent.clamp_(-100, 100)
    sc = torch.pow(2.0, e.to(torch.float64))  # exact powers of two; see exact_stats
    inv = sc.reciprocal().to(rows.dtype)
    xs = torch.where(fin, rows * inv[:, None], 0.0)
    m_s64 = m_s.to(torch.float64)
    row_mean = xs.sum(1) * sc / m_s64.clamp(min=1)
    count = torch.where(large, exact[:, _COUNT], m_s64)
    exact_mean = exact[:, _SUM] / count.clamp(min=1)
    # A large tensor's mean from every element, unless its float32 sum overflowed; a small one's from its row.
    mean = torch.where(large & (exact_mean.abs() < math.inf), exact_mean, row_mean)
    d = torch.where(fin, xs - (mean * inv).to(rows.dtype)[:, None], 0.0)
    zeros = (rows == 0).sum(1)
    scale = torch.where(large, count / m_s64.clamp(min=1), 1.0)
    m2 = (d * d).sum(1) * sc * sc * scale
    head = torch.stack(
        STATS.ordered(
            count=count,
            mean=mean,
            m2=m2,
            min=mn.to(torch.float64),
            max=mx.to(torch.float64),
            zero_count=zeros * scale,
        ),
        dim=1,
    )
    return torch.cat([head, _masked_counts(rows, fin, zeros, mn, mx, inv, bins)], dim=1)
