"""The Triton kernels of `actdiag.hooks.fused` (what they compute, and why so: that module's docstring). Imported only
through `fused._kernels()`: importing it needs triton, the optional extra `actdiag[gpu]`."""

# mypy: ignore-errors
# Triton kernels are typed by Triton, not by annotations; ruff's import sorting and formatting apply as usual.
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _moments_block(x, inside, cnt, mean, m2, lo, hi, zeros, bad, hist):
    """One block's values `x` (float32; padding NaN, outside `inside`) merged into a program's accumulators."""
    big = float("inf")
    fin = tl.abs(x) < big  # NaN compares False
    nb = tl.sum(fin.to(tl.int32))
    zeros += tl.sum((x == 0.0).to(tl.int32))
    bad += tl.sum((inside & ~fin).to(tl.int32))
    lo_b = tl.min(tl.where(fin, x, big))
    hi_b = tl.max(tl.where(fin, x, -big))
    lo = tl.minimum(lo, lo_b)
    hi = tl.maximum(hi, hi_b)
    # The power of two 2**(127 - e), e the biased exponent of the block's largest finite magnitude clamped to
    # 1..253 (so that it is a normal float32): that magnitude lands in [1, 2), where no square overflows.
    be = (tl.maximum(tl.maximum(-lo_b, hi_b), 0.0).to(tl.int32, bitcast=True) >> 23) & 0xFF
    inv = ((254 - tl.minimum(tl.maximum(be, 1), 253)) << 23).to(tl.float32, bitcast=True)
    xs = tl.where(fin, x * inv, 0.0)
    mb = tl.sum(xs) / tl.maximum(nb, 1).to(tl.float32)
    d = tl.where(fin, xs - mb, 0.0)
    r = tl.sum(d)  # what the float32 mean `mb` missed: the block's exact mean is mb + r / nb
    q = tl.sum(d * d)
    # Chan's update of the running float64 moments by the block's (nb, exact mean, m2 about it), unscaled.
    sc = 1.0 / inv.to(tl.float64)  # exact: a power of two
    nb64 = nb.to(tl.float64)
    nb64_1 = tl.maximum(nb64, 1.0)
    r64 = r.to(tl.float64)
    mu = (mb.to(tl.float64) + r64 / nb64_1) * sc
    q64 = tl.maximum(q.to(tl.float64) - r64 * r64 / nb64_1, 0.0) * sc * sc
    tot = cnt + nb64
    delta = mu - mean
    w = nb64 / tl.maximum(tot, 1.0)
    mean += delta * w
    m2 += q64 + delta * delta * cnt * w
    # Exponent bins from the float32 bits of |x|; zeros (counted apart), Inf, NaN and padding go to bin 255.
    expo = (x.to(tl.int32, bitcast=True) >> 23) & 0xFF
    hist += tl.histogram(tl.where(x == 0.0, 255, expo), 256)
    return tot, mean, m2, lo, hi, zeros, bad, hist


@triton.jit
def moments_kernel(
    x_ptr,
    table_ptr,
    prog_ptr,
    part_ptr,
    hist_ptr,
    K,
    LAST,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    p = tl.program_id(0)
    t = tl.load(prog_ptr + 3 * p)
    start = tl.load(prog_ptr + 3 * p + 1)  # a multiple of BLOCK
    end = tl.load(prog_ptr + 3 * p + 2)
    # The tensor's offset from x_ptr, in elements: the table's, but the last tensor's is LAST (fused._run says why).
    base = tl.load(table_ptr + t) + tl.where(t == K - 1, LAST, 0)
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    start = tl.multiple_of(start, BLOCK)
    full = start + (end - start) // BLOCK * BLOCK
    big = float("inf")
    cnt = tl.full([], 0.0, tl.float64)
    mean = tl.full([], 0.0, tl.float64)
    m2 = tl.full([], 0.0, tl.float64)
    lo = tl.full([], big, tl.float32)
    hi = tl.full([], -big, tl.float32)
    zeros = tl.full([], 0, tl.int32)
    bad = tl.full([], 0, tl.int32)
    hist = tl.zeros([256], dtype=tl.int32)
    inside = tl.full([BLOCK], 1, tl.int1)
    # Whole blocks without a mask (so that the loads can be vectorised), then the last, partial one.
    for i in range(start, full, BLOCK):
        x = tl.load(x_ptr + base + i + tl.arange(0, BLOCK)).to(tl.float32)
        cnt, mean, m2, lo, hi, zeros, bad, hist = _moments_block(x, inside, cnt, mean, m2, lo, hi, zeros, bad, hist)
    for i in range(full, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + idx, mask=idx < end, other=float("nan")).to(tl.float32)
        cnt, mean, m2, lo, hi, zeros, bad, hist = _moments_block(x, idx < end, cnt, mean, m2, lo, hi, zeros, bad, hist)
    out = part_ptr + 7 * p
    tl.store(out, cnt)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)
    tl.store(out + 3, lo.to(tl.float64))
    tl.store(out + 4, hi.to(tl.float64))
    tl.store(out + 5, zeros.to(tl.float64))
    tl.store(out + 6, bad.to(tl.float64))
    tl.store(hist_ptr + 256 * p + tl.arange(0, 256), hist)


@triton.jit
def combine_kernel(
    table_ptr,
    part_ptr,
    hist_ptr,
    rows_ptr,
    K,
    C_COUNT: tl.constexpr,
    C_MEAN: tl.constexpr,
    C_M2: tl.constexpr,
    C_MIN: tl.constexpr,
    C_MAX: tl.constexpr,
    C_ZERO: tl.constexpr,
    C_LIN: tl.constexpr,
    C_EXP: tl.constexpr,
    C_BAD: tl.constexpr,
    WIDTH: tl.constexpr,
    BINS: tl.constexpr,
    LIN_P2: tl.constexpr,
    PB: tl.constexpr,
):
    t = tl.program_id(0)
    first = tl.load(table_ptr + 2 * K + t)
    stop = first + tl.load(table_ptr + 3 * K + t)
    row = tl.load(table_ptr + 4 * K + t)
    big = float("inf")
    cnt = tl.full([], 0.0, tl.float64)
    mean = tl.full([], 0.0, tl.float64)
    m2 = tl.full([], 0.0, tl.float64)
    lo = tl.full([], big, tl.float64)
    hi = tl.full([], -big, tl.float64)
    zeros = tl.full([], 0.0, tl.float64)
    bad = tl.full([], 0.0, tl.float64)
    hist = tl.zeros([256], dtype=tl.int64)
    for j in range(first, stop, PB):
        jj = j + tl.arange(0, PB)
        m = jj < stop
        n_j = tl.load(part_ptr + 7 * jj, mask=m, other=0.0)
        mean_j = tl.load(part_ptr + 7 * jj + 1, mask=m, other=0.0)
        nc = tl.sum(n_j)
        mc = tl.sum(n_j * mean_j) / tl.maximum(nc, 1.0)
        dev = tl.where(n_j > 0, mean_j - mc, 0.0)
        qc = tl.sum(tl.load(part_ptr + 7 * jj + 2, mask=m, other=0.0) + n_j * dev * dev)
        tot = cnt + nc
        delta = mc - mean
        w = nc / tl.maximum(tot, 1.0)
        mean += delta * w
        m2 += qc + delta * delta * cnt * w
        cnt = tot
        lo = tl.minimum(lo, tl.min(tl.load(part_ptr + 7 * jj + 3, mask=m, other=big)))
        hi = tl.maximum(hi, tl.max(tl.load(part_ptr + 7 * jj + 4, mask=m, other=-big)))
        zeros += tl.sum(tl.load(part_ptr + 7 * jj + 5, mask=m, other=0.0))
        bad += tl.sum(tl.load(part_ptr + 7 * jj + 6, mask=m, other=0.0))
        h = tl.load(hist_ptr + 256 * jj[:, None] + tl.arange(0, 256)[None, :], mask=m[:, None], other=0)
        hist += tl.sum(h.to(tl.int64), axis=0)
    out = rows_ptr + WIDTH * row
    tl.store(out + C_COUNT, cnt)
    tl.store(out + C_MEAN, mean)
    tl.store(out + C_M2, m2)
    tl.store(out + C_MIN, lo)
    tl.store(out + C_MAX, hi)
    tl.store(out + C_ZERO, zeros)
    tl.store(out + C_BAD, bad)
    b = tl.arange(0, LIN_P2)
    tl.store(out + C_LIN + b, tl.zeros([LIN_P2], dtype=tl.float64), mask=b < BINS)
    e = tl.arange(0, 256)
    tl.store(out + C_EXP + e, hist.to(tl.float64), mask=e < 255)


@triton.jit
def _linear_block(x, inv, lo_s, k32, BINS: tl.constexpr, LIN_P2: tl.constexpr):
    """The linear-bin counts of one block (non-finite values and padding in bin BINS, which is dropped)."""
    pos = (x * inv - lo_s) * k32
    b = tl.minimum(tl.maximum(pos, 0.0), BINS - 1.0).to(tl.int32)  # truncation of values >= 0: the floor
    return tl.histogram(tl.where(tl.abs(x) < float("inf"), b, BINS), LIN_P2)


@triton.jit
def linear_kernel(
    x_ptr,
    table_ptr,
    prog_ptr,
    rows_ptr,
    K,
    LAST,
    C_MIN: tl.constexpr,
    C_MAX: tl.constexpr,
    C_LIN: tl.constexpr,
    WIDTH: tl.constexpr,
    BINS: tl.constexpr,
    LIN_P2: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    p = tl.program_id(0)
    t = tl.load(prog_ptr + 3 * p)
    start = tl.load(prog_ptr + 3 * p + 1)
    end = tl.load(prog_ptr + 3 * p + 2)
    base = tl.load(table_ptr + t) + tl.where(t == K - 1, LAST, 0)  # as in moments_kernel
    row = tl.load(table_ptr + 4 * K + t)
    if ALIGNED:
        base = tl.multiple_of(base, 16)
    start = tl.multiple_of(start, BLOCK)
    full = start + (end - start) // BLOCK * BLOCK
    lo = tl.load(rows_ptr + WIDTH * row + C_MIN)
    hi = tl.load(rows_ptr + WIDTH * row + C_MAX)
    # As stats._masked_counts: in the space scaled by the power of two that brings the largest finite magnitude
    # near 1, `x - min` and `bins / span` cannot overflow. Without a finite value every element is masked.
    amax = tl.where(lo <= hi, tl.maximum(-lo, hi), 0.0).to(tl.float32)
    be = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # the power of two of moments_kernel
    inv = ((254 - tl.minimum(tl.maximum(be, 1), 253)) << 23).to(tl.float32, bitcast=True)
    lo_s = tl.where(lo <= hi, lo, 0.0).to(tl.float32) * inv
    hi_s = tl.where(lo <= hi, hi, 0.0).to(tl.float32) * inv
    k32 = BINS / tl.maximum(hi_s - lo_s, 1e-30)
    hist = tl.zeros([LIN_P2], dtype=tl.int32)
    for i in range(start, full, BLOCK):  # as in moments_kernel: whole blocks, then the partial one
        x = tl.load(x_ptr + base + i + tl.arange(0, BLOCK)).to(tl.float32)
        hist += _linear_block(x, inv, lo_s, k32, BINS, LIN_P2)
    for i in range(full, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + base + idx, mask=idx < end, other=float("nan")).to(tl.float32)
        hist += _linear_block(x, inv, lo_s, k32, BINS, LIN_P2)
    j = tl.arange(0, LIN_P2)
    tl.atomic_add(rows_ptr + WIDTH * row + C_LIN + j, hist.to(tl.float64), mask=j < BINS)
