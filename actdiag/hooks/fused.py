"""A fused statistics kernel (Triton) for CUDA: every statistic of a tensor, or of a batch of tensors, in two reads.

`fused_stats(tensors)` computes, for each tensor of a list (flat or not, any sizes, float32/float16/bfloat16), over
its finite values: count, mean, m2 (sum of squared deviations from the mean), min, max, the zero count, the
non-finite count, the exponent histogram (float32 biased exponents 0..254 of the non-zero finite values; see
`actdiag.records.E_LOW`) and a linear histogram of `bins` bins between min and max. It returns one float64 row per
tensor in the vector layout of `actdiag.hooks.stats.tensor_stats` (`layout.STATS`; `FusedStats.vectors`), so that
the recorder can use the rows where it uses `tensor_stats`' vectors; nothing is read back to the host.

Three kernel launches per call, whatever the number of tensors:

1. `moments_kernel` reads every element once. Each program takes a span of elements of one tensor, in blocks
   of `BLOCK`; each block is scaled by a power of two (so that no square overflows or underflows in float32), its
   mean, its sum of squared deviations from that mean and the residual sum of deviations are reduced in float32,
   and the block is merged into the program's float64 running moments by Chan's update (the residual corrects the
   block's float32 mean exactly, so a large mean costs no precision). The program writes its partial moments,
   extremes and counts and its 256-bin exponent histogram (bin 255 takes zeros, Inf, NaN and padding).
2. `combine_kernel`, one program per tensor, merges its programs' partials (Chan again, in float64) and writes the
   tensor's whole row: the named slots, the exponent histogram, zeros where the linear histogram will go.
3. `linear_kernel` reads every element a second time and adds each program's linear histogram into the row
   (atomic float64 adds of integer counts: exact, so the order does not matter). The bins are those of
   `stats._masked_counts`: min and max scaled by a power of two, `floor((x * inv - lo) * bins / span)`.

Bytes read per element: two reads of the tensor (2 x its element size: 8 for float32, 4 for float16/bfloat16),
plus the partials (`PARTIAL_BYTES` per program; a tensor of n >= CHUNK elements has at most n / CHUNK programs,
so under 0.07 byte per element). Whole blocks are read without a mask, so that the loads are vectorised. A batch
needs one small table (where each tensor starts, its size, its programs): it is built on the host, copied to the
device in one asynchronous copy from pinned memory and cached, keyed by the tensors' sizes and their offsets from
the first one's memory but the last one's, which the kernels take as an argument (a batch of rows of one buffer,
the same from step to step, hits the cache; so does any single contiguous tensor of a known size, and any pair of
tensors of known sizes, such as a weight and its gradient). Non-contiguous tensors are made contiguous first (a
copy); a batch of several dtypes makes one set of launches per dtype; float64 and integer tensors are not taken (the
torch path measures them: `fused_supported`).

Selection: `fused_available(device)` is true on CUDA when triton imports; `ACTDIAG_FUSED=1` forces it on any device,
`ACTDIAG_FUSED=0` turns it off. On CPU tensors the kernels run only in Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported): slow, for the tests that check them without a GPU.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from actdiag.hooks.layout import N_EXP, STATS

DEFAULT_BINS = 64
# A program reads at least CHUNK elements in blocks of BLOCK. BLOCK is a few registers per thread of a 4-warp
# program; CHUNK keeps each program's partials (PARTIAL_BYTES) small beside the bytes it reads, and a large tensor's
# programs many enough to fill a GPU (a 2**20-element tensor gets 64). Beyond MAX_PROGRAMS x CHUNK elements a tensor
# keeps MAX_PROGRAMS programs, each reading more: one program of combine_kernel merges them all.
BLOCK = 1024
CHUNK = 16 * BLOCK
MAX_PROGRAMS = 1024
PARTIAL_BYTES = 7 * 8 + 256 * 4  # what each program writes for combine_kernel to read
_PARTIAL_BLOCK = 16  # partials merged per step of combine_kernel ([16, 256] histogram counts in registers)
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
ENV_SWITCH = "ACTDIAG_FUSED"


@dataclass(frozen=True, slots=True)
class Columns:
    """Where the kernels write each statistic in a row; `width` is the row's length (the last column holds the
    non-finite count, which the vector layout leaves to `numel - count`)."""

    count: int
    mean: int
    m2: int
    min: int
    max: int
    zero_count: int
    lin: int  # first of `bins` linear bins
    exp: int  # first of N_EXP exponent bins
    nonfinite: int
    width: int


def columns(bins: int) -> Columns:
    """The row layout: the statistics vector of `layout.STATS` (its named slots, `bins` linear bins, the exponent
    bins), then the non-finite count, which the vector leaves to `numel - count`. The kernels take every column
    from here; a layout with slots of its own kernels (`Layout.with_slot`) is filled by `with_extra_slots`."""
    head = STATS.head
    return Columns(
        count=STATS.index("count"),
        mean=STATS.index("mean"),
        m2=STATS.index("m2"),
        min=STATS.index("min"),
        max=STATS.index("max"),
        zero_count=STATS.index("zero_count"),
        lin=head,
        exp=head + bins,
        nonfinite=STATS.length(bins),
        width=STATS.length(bins) + 1,
    )


@dataclass(frozen=True, slots=True)
class FusedStats:
    """The statistics of K tensors: one float64 tensor per field, on the tensors' device."""

    count: torch.Tensor  # [K] finite values
    mean: torch.Tensor  # [K] of the finite values (0 without any)
    m2: torch.Tensor  # [K] sum of squared deviations from the mean
    min: torch.Tensor  # [K] +inf without a finite value
    max: torch.Tensor  # [K] -inf without a finite value
    zero_count: torch.Tensor  # [K]
    nonfinite: torch.Tensor  # [K] NaN and +-Inf
    lin: torch.Tensor  # [K, bins] linear histogram between min and max (a constant tensor: all in bin 0)
    exp: torch.Tensor  # [K, N_EXP] exponent histogram of the finite non-zero values
    vectors: torch.Tensor  # [K, STATS.length(bins)] the vectors of stats.tensor_stats (views of the same memory)


def split_rows(rows: torch.Tensor, bins: int) -> FusedStats:
    """The named fields of the kernels' rows ([K, columns(bins).width], float64): views, no copy."""
    c = columns(bins)
    return FusedStats(
        count=rows[:, c.count],
        mean=rows[:, c.mean],
        m2=rows[:, c.m2],
        min=rows[:, c.min],
        max=rows[:, c.max],
        zero_count=rows[:, c.zero_count],
        nonfinite=rows[:, c.nonfinite],
        lin=rows[:, c.lin : c.lin + bins],
        exp=rows[:, c.exp : c.exp + N_EXP],
        vectors=rows[:, : c.nonfinite],
    )


# ---------------------------------------------------------------------------------------------------- selection
@functools.cache
def _triton() -> Any:
    """The triton module, or None when it does not import (it is the optional extra `actdiag[gpu]`)."""
    try:
        import triton  # noqa: F401

        return triton
    except ImportError:
        return None


def fused_available(device: torch.device | str) -> bool:
    """Whether `fused_stats` is the path for tensors on `device`: CUDA with triton importable, unless the
    environment variable ACTDIAG_FUSED says otherwise (1: on any device, e.g. the CPU under TRITON_INTERPRET=1; 0:
    never)."""
    switch = os.environ.get(ENV_SWITCH, "")
    if switch == "0":
        return False
    if switch == "1":
        return True
    return torch.device(device).type == "cuda" and _triton() is not None


def fused_supported(x: torch.Tensor) -> bool:
    """Whether `fused_stats` takes `x` (float32, float16 and bfloat16; the torch path measures the rest)."""
    return x.dtype in _SUPPORTED


def _require_triton() -> Any:
    triton = _triton()
    if triton is None:
        raise ImportError("the fused statistics kernel needs triton: pip install 'actdiag[gpu]'")
    return triton


# ---------------------------------------------------------------------------------------------------- kernels
def _kernels(device: torch.device) -> tuple[Any, Any, Any]:
    """The three kernels (`_fused_triton`, imported on first use: importing this module never needs triton).

    Triton decides when it is imported whether kernels are compiled or interpreted (TRITON_INTERPRET=1): CPU tensors
    need the interpreter, GPU tensors the compiled kernels, and one process cannot have both."""
    _require_triton()
    from triton.runtime.interpreter import InterpretedFunction

    from actdiag.hooks import _fused_triton as k

    kernels = (k.moments_kernel, k.combine_kernel, k.linear_kernel)
    if device.type == "cpu" and not isinstance(k.moments_kernel, InterpretedFunction):
        raise RuntimeError(
            "the fused statistics kernel runs on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported"
        )
    return kernels


def _launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """Every kernel launch of this module goes through here (bench/count_ops.py counts them by wrapping it)."""
    kernel[grid](*args, **kwargs)


# ---------------------------------------------------------------------------------------------------- tables
class _Plan(NamedTuple):
    table: torch.Tensor  # int64 on the device: [5, K] offsets, numels, first program, programs, output row
    progs: torch.Tensor  # int64 on the device: [P, 3] (tensor, first element, end)
    n_progs: int
    aligned: bool


_PLANS: OrderedDict[tuple[Any, ...], _Plan] = OrderedDict()
_MAX_PLANS = 32


def program_span(numel: int) -> int:
    """Elements per program of a tensor of `numel` elements (its last program may read fewer)."""
    per = -(-numel // MAX_PROGRAMS)
    return max(CHUNK, -(-per // BLOCK) * BLOCK)


def programs(numel: int) -> int:
    """Programs of the two reading kernels for a tensor of `numel` elements."""
    return -(-numel // program_span(numel))


def _plan(offsets: Sequence[int], numels: Sequence[int], rows: Sequence[int], device: torch.device) -> _Plan:
    key = (device, tuple(offsets), tuple(numels), tuple(rows), CHUNK, MAX_PROGRAMS)
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    n = np.asarray(numels, dtype=np.int64)
    span = np.array([program_span(int(v)) for v in numels], dtype=np.int64)
    counts = -(-n // span)
    first = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=first[1:])
    table = np.stack([np.asarray(offsets, dtype=np.int64), n, first, counts, np.asarray(rows, dtype=np.int64)])
    tensor_of = np.repeat(np.arange(len(n), dtype=np.int64), counts)
    start = (np.arange(len(tensor_of), dtype=np.int64) - first[tensor_of]) * span[tensor_of]
    progs = np.stack([tensor_of, start, np.minimum(start + span[tensor_of], n[tensor_of])], axis=1)
    # Vector loads need every tensor to start on a 16-element boundary of the first (true of rows of one buffer
    # whose width is a multiple of 16, and of any single tensor).
    aligned = bool((table[0] % 16 == 0).all())
    # One copy for both; the programs' part starts 16-byte aligned, like any tensor (one compiled variant).
    skip = table.size + table.size % 2
    both = _to_device(
        np.concatenate([table.reshape(-1), np.zeros(skip - table.size, np.int64), progs.reshape(-1)]), device
    )
    plan = _Plan(both[: table.size], both[skip:], len(tensor_of), aligned)
    _PLANS[key] = plan
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":  # from pinned memory, asynchronously: a pageable copy would synchronise the host
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------------------------------------------- entry points
def fused_stats(tensors: Sequence[torch.Tensor], *, bins: int = DEFAULT_BINS) -> FusedStats:
    """The statistics of each tensor (see the module docstring), one row each in the order given.

    Every tensor must be on one device and of a `fused_supported` dtype; a mix of those dtypes makes one set of
    launches per dtype. Nothing is read back to the host.
    """
    if not tensors:
        raise ValueError("fused_stats needs at least one tensor")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    device = tensors[0].device
    groups: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(tensors):
        if x.device != device:
            raise ValueError(f"fused_stats takes tensors on one device, got {device} and {x.device}")
        if x.dtype not in _SUPPORTED:
            raise TypeError(f"fused_stats takes float32, float16 and bfloat16 tensors, got {x.dtype}")
        groups.setdefault(x.dtype, []).append(i)
    cols = columns(bins)
    rows = torch.empty((len(tensors), cols.width), dtype=torch.float64, device=device)
    for members in groups.values():
        _run([tensors[i] for i in members], members, rows, bins, cols)
    return split_rows(rows, bins)


def fused_vectors(tensors: Sequence[torch.Tensor], *, bins: int = DEFAULT_BINS) -> torch.Tensor:
    """[K, STATS.length(bins)] float64: each tensor's vector as `stats.tensor_stats` lays it out, computed by the
    fused kernels (row k is what `tensor_stats(tensors[k], bins=bins, sample_cap=numel)` gives, up to rounding)."""
    return fused_stats(tensors, bins=bins).vectors


def _run(
    tensors: Sequence[torch.Tensor], out_rows: Sequence[int], rows: torch.Tensor, bins: int, cols: Columns
) -> None:
    """Launch the three kernels over tensors of one dtype, writing row `out_rows[k]` of `rows` for tensor k."""
    moments, combine, linear = _kernels(rows.device)
    flat = [x.detach().reshape(-1) if x.is_contiguous() else x.detach().contiguous().reshape(-1) for x in tensors]
    base = next((f for f in flat if f.numel()), flat[0])
    size = base.element_size()
    ptr0 = base.data_ptr()
    offsets = [(f.data_ptr() - ptr0) // size if f.numel() else 0 for f in flat]
    numels = [f.numel() for f in flat]
    # The last tensor's offset is passed to the kernels as an argument (LAST), not in the cached table: a tensor
    # and another of its own allocation (a weight and its gradient, measured together by DeviceBatch.together)
    # are then one table whatever their addresses, which change from step to step. Each new table is a copy to
    # the device.
    last = offsets[-1]
    plan = _plan([*offsets[:-1], 0], numels, out_rows, rows.device)
    aligned = plan.aligned and last % 16 == 0
    k = len(flat)
    n_parts = max(plan.n_progs, 1)
    parts = torch.empty((n_parts, 7), dtype=torch.float64, device=rows.device)
    hists = torch.empty((n_parts, 256), dtype=torch.int32, device=rows.device)
    lin_p2 = 1 << bins.bit_length()  # a power of two above `bins`: the histogram's last bin takes the rest
    if plan.n_progs:
        _launch(
            moments,
            (plan.n_progs,),
            base,
            plan.table,
            plan.progs,
            parts,
            hists,
            k,
            last,
            BLOCK=BLOCK,
            ALIGNED=aligned,
        )
    _launch(
        combine,
        (k,),
        plan.table,
        parts,
        hists,
        rows,
        k,
        C_COUNT=cols.count,
        C_MEAN=cols.mean,
        C_M2=cols.m2,
        C_MIN=cols.min,
        C_MAX=cols.max,
        C_ZERO=cols.zero_count,
        C_LIN=cols.lin,
        C_EXP=cols.exp,
        C_BAD=cols.nonfinite,
        WIDTH=cols.width,
        BINS=bins,
        LIN_P2=lin_p2,
        PB=_PARTIAL_BLOCK,
    )
    if plan.n_progs:
        _launch(
            linear,
            (plan.n_progs,),
            base,
            plan.table,
            plan.progs,
            rows,
            k,
            last,
            C_MIN=cols.min,
            C_MAX=cols.max,
            C_LIN=cols.lin,
            WIDTH=cols.width,
            BINS=bins,
            LIN_P2=lin_p2,
            BLOCK=BLOCK,
            ALIGNED=aligned,
        )
