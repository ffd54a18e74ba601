"""The statistics vector, named: which slot holds what, how it merges across ranks, how it decodes.

A tensor's statistics travel as one float64 vector (so that a recorded step reads everything back with one copy
and merges across ranks with one collective):

    [slot_0 .. slot_{S-1}, lin_0 .. lin_{B-1}, exp_0 .. exp_{NE-1}]

the named slots of a `Layout` (`STATS`: count, mean, m2, min, max, zero_count), then a linear histogram of B bins
between min and max and the exponent histogram (see `actdiag.records.E_LOW`). Every kernel writes the slots by name
(`STATS.put`, or the slot's index `STATS.COUNT`...), `decode_many` reads them by name and `merge_vectors` merges
each slot by the rule written beside it. Adding a statistic is one `Slot`: its name, its merge rule, the value of
an empty tensor and, for a slot the built-in kernels do not compute, a `kernel` from the tensor's finite values
(`Layout.with_slot`; tests/hooks/test_hooks_layout.py adds one and follows it to the record and the merge).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch

from actdiag.records import E_HIGH, E_LOW, TensorStats, _step_stats, _StepHistograms

N_EXP = E_HIGH - E_LOW + 1  # 255 float32 binades: biased exponents 0 (subnormal) .. 254


class Merge(Enum):
    """How one slot of several ranks' vectors becomes the slot of the whole batch's vector."""

    SUM = "sum"  # counts: added
    MIN = "min"  # over the ranks that saw a finite value
    MAX = "max"
    MEAN = "mean"  # Chan, Golub & LeVeque's pairwise update, weighted by the `count` slot
    M2 = "m2"  # sum of squared deviations: m2_a + m2_b + delta**2 * n_a * n_b / n (no cancellation)


@dataclass(frozen=True, slots=True)
class Slot:
    """One named statistic of the vector.

    `empty`: its value for a tensor with no finite element. `estimated_as`: the `TensorStats` field it becomes,
    when it may come from a large tensor's sample (see "Exactness" in CONTRACT.md); None for the slots that are
    exact at every interval. `kernel`: for a slot the built-in kernels do not compute, a function of the tensor's
    finite values (1-D, float64) returning a 0-d tensor; it is evaluated per tensor, never in the batched paths.
    """

    name: str
    merge: Merge
    empty: float = 0.0
    estimated_as: str | None = None
    kernel: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Layout:
    """The named slots of a statistics vector, followed by the two histogram blocks (module docstring)."""

    slots: tuple[Slot, ...]

    def __post_init__(self) -> None:
        names = [s.name for s in self.slots]
        if len(set(names)) != len(names):
            raise ValueError(f"slot names must be unique, got {names}")
        for i, name in enumerate(names):  # STATS.COUNT, STATS.MEAN, ...: the index of each slot, by name
            object.__setattr__(self, name.upper(), i)

    def __getattr__(self, name: str) -> int:  # for mypy: the slot indices set in __post_init__
        raise AttributeError(name)

    @property
    def head(self) -> int:
        """Number of named slots (where the linear histogram starts)."""
        return len(self.slots)

    def index(self, name: str) -> int:
        for i, s in enumerate(self.slots):
            if s.name == name:
                return i
        raise KeyError(f"no slot named {name!r} in this layout ({', '.join(s.name for s in self.slots)})")

    def length(self, bins: int) -> int:
        return self.head + bins + N_EXP

    def lin(self, bins: int) -> slice:
        """Where the linear histogram's counts are."""
        return slice(self.head, self.head + bins)

    def exp(self, bins: int) -> slice:
        """Where the exponent histogram's counts are."""
        return slice(self.head + bins, self.head + bins + N_EXP)

    def with_slot(self, slot: Slot) -> Layout:
        """A copy of this layout with one more slot (after the others, so theirs keep their indices)."""
        return Layout((*self.slots, slot))

    @property
    def extra(self) -> tuple[Slot, ...]:
        """The slots computed by their own kernel (those `STATS` does not have)."""
        return tuple(s for s in self.slots if s.kernel is not None)

    def ordered(self, **values: Any) -> list[Any]:
        """The built-in slots' values, given by name, in the order of the vector (for a stack or a row)."""
        return [values[s.name] for s in self.slots if s.kernel is None]

    def put(self, out: Any, **values: Any) -> None:
        """Write named slot values into `out`, a vector (numpy or torch) or a [K, length] block (a column each)."""
        for name, value in values.items():
            out[..., self.index(name)] = value

    def empty_vector(self, bins: int, device: torch.device) -> torch.Tensor:
        """The vector of a tensor with no element."""
        out = torch.zeros(self.length(bins), dtype=torch.float64, device=device)
        for i, s in enumerate(self.slots):
            if s.empty:
                out[i] = s.empty
        return out


STATS = Layout(
    (
        Slot("count", Merge.SUM),  # finite values
        Slot("mean", Merge.MEAN, empty=0.0),
        Slot("m2", Merge.M2, estimated_as="std"),
        Slot("min", Merge.MIN, empty=math.inf),
        Slot("max", Merge.MAX, empty=-math.inf),
        Slot("zero_count", Merge.SUM, estimated_as="zero_fraction"),
    )
)
# What a large tensor's histograms are when they come from its sample on the estimated path.
HISTOGRAM_FIELD = "histogram"


@dataclass(frozen=True, slots=True)
class StatsMeta:
    """What the host knows about a vector without reading it: sizes, layout, and whether the estimated path (some
    slots from the sample, see `Slot.estimated_as`) made it."""

    numel: int
    bins: int
    sample_n: int  # elements that went into the histograms
    estimated: bool = False
    layout: Layout = field(default=STATS, repr=False)

    @property
    def length(self) -> int:
        return self.layout.length(self.bins)

    @property
    def sampled(self) -> bool:
        return self.sample_n < self.numel

    def estimated_fields(self) -> tuple[str, ...]:
        """The `TensorStats` fields that come from the sample (empty when every field is exact)."""
        if not self.estimated:
            return ()
        names = tuple(s.estimated_as for s in self.layout.slots if s.estimated_as is not None)
        return (*names, HISTOGRAM_FIELD)


def with_extra_slots(vec: torch.Tensor, x: torch.Tensor, layout: Layout, bins: int) -> torch.Tensor:
    """`vec` (the `STATS` vector of `x`) laid out as `layout`, its extra slots computed by their kernels from the
    finite values of `x` (or their `empty` value without any)."""
    if layout is STATS:
        return vec
    flat = x.detach().reshape(-1).to(torch.float64)
    finite = flat[torch.isfinite(flat)]
    out = torch.empty(layout.length(bins), dtype=torch.float64, device=vec.device)
    for i, s in enumerate(layout.slots):
        if s.kernel is not None:
            out[i] = s.kernel(finite).to(torch.float64) if finite.numel() else s.empty
        else:
            out[i] = vec[STATS.index(s.name)]
    out[layout.head :] = vec[STATS.head :]
    return out


# ---------------------------------------------------------------------------------------------------- merging
def merge_vectors(
    rows: np.ndarray, extras: np.ndarray, bins: int, layout: Layout = STATS
) -> tuple[np.ndarray, StatsMeta]:
    """Merge the vectors of several ranks (one per row) into one vector and its meta, slot by slot by each slot's
    rule. `extras[r] = (numel, sample_n, estimated)` of rank r."""
    count_i = layout.index("count")
    counts = rows[:, count_i]
    have = counts > 0
    out = np.zeros(rows.shape[1])
    for i, s in enumerate(layout.slots):
        col = rows[:, i]
        if s.merge is Merge.SUM:
            out[i] = float(col.sum())
        elif s.merge is Merge.MIN:
            out[i] = float(col[have].min()) if have.any() else s.empty
        elif s.merge is Merge.MAX:
            out[i] = float(col[have].max()) if have.any() else s.empty
    mean_i = [i for i, s in enumerate(layout.slots) if s.merge is Merge.MEAN]
    m2_i = [i for i, s in enumerate(layout.slots) if s.merge is Merge.M2]
    if mean_i:
        n = mean = m2 = 0.0
        for r in np.flatnonzero(have):
            nb = float(counts[r])
            mb = float(rows[r, mean_i[0]])
            m2b = float(rows[r, m2_i[0]]) if m2_i else 0.0
            tot = n + nb
            delta = mb - mean
            mean += delta * nb / tot
            m2 += m2b + delta * delta * n * nb / tot
            n = tot
        out[mean_i[0]] = mean
        if m2_i:
            out[m2_i[0]] = m2
    lo, hi = layout.index("min"), layout.index("max")
    out[layout.lin(bins)] = rebin(rows[:, lo], rows[:, hi], rows[:, layout.lin(bins)], have)
    out[layout.exp(bins)] = rows[:, layout.exp(bins)].sum(axis=0)
    numel, sample_n, estimated = (int(round(v)) for v in extras.sum(axis=0))
    meta = StatsMeta(numel=numel, bins=bins, sample_n=sample_n, estimated=estimated > 0, layout=layout)
    return out, meta


def rebin(mins: np.ndarray, maxs: np.ndarray, counts: np.ndarray, have: np.ndarray) -> np.ndarray:
    """Linear histograms of several ranks (each between its own min and max) onto common edges from the global
    min to the global max, with the same number of bins, by spreading each source bin uniformly over the bins it
    overlaps. Totals are exact, and a count moves at most into a neighbouring bin (a source bin is never wider
    than a common one); the edges are exactly those a single process would use."""
    bins = counts.shape[1]
    merged = np.zeros(bins)
    if not have.any():
        return merged
    lo, hi = float(mins[have].min()), float(maxs[have].max())
    total = float(counts[have].sum())
    if not hi > lo:
        merged[0] = total
        return merged
    edges = np.linspace(lo, hi, bins + 1)
    for r in np.flatnonzero(have):
        c = counts[r]
        a, b = float(mins[r]), float(maxs[r])
        if b > a:
            src = np.linspace(a, b, bins + 1)
            cdf = np.concatenate([[0.0], np.cumsum(c)])
            merged += np.diff(np.interp(edges, src, cdf))
        else:
            # A constant rank: every value is `a`; it goes where the kernel would have binned it.
            i = min(int((a - lo) * (bins / (hi - lo))), bins - 1)
            merged[i] += float(c.sum())
    return _round_preserving_total(merged, total)


def _round_preserving_total(x: np.ndarray, total: float) -> np.ndarray:
    """Integer counts close to `x` that add up to `total` exactly (largest remainders get the leftover units)."""
    floor = np.floor(x + 1e-9)
    short = int(round(total - floor.sum()))
    if short > 0:
        order = np.argsort(-(x - floor), kind="stable")
        floor[order[:short]] += 1
    elif short < 0:
        order = np.argsort(x - floor, kind="stable")
        for i in order:
            if short == 0:
                break
            if floor[i] > 0:
                floor[i] -= 1
                short += 1
    return floor


# ---------------------------------------------------------------------------------------------------- decoding
def decode_tensor_stats(vec: np.ndarray, meta: StatsMeta) -> TensorStats:
    """Turn one vector (read back to the host) into a TensorStats."""
    return decode_many([vec], [meta])[0]


def _stacked(vecs: list[np.ndarray], length: int) -> np.ndarray:
    """[K, length] float64: the first `length` values of each vector. One np.array call when they are all of one
    length (nearly always), a quarter of what converting and slicing each costs at a deep model's thousands."""
    try:
        block = np.array(vecs, dtype=np.float64)
    except ValueError:  # vectors of several lengths (extra slots)
        block = None
    if block is None or block.ndim != 2 or block.shape[1] < length:
        return np.stack([np.asarray(v, dtype=np.float64)[:length] for v in vecs])
    return block[:, :length]


def decode_many(vecs: Sequence[np.ndarray], metas: Sequence[StatsMeta]) -> list[TensorStats]:
    """`decode_tensor_stats` for a whole step at once (`DecodedStep`)."""
    return DecodedStep(vecs, metas).objects() if vecs else []


class DecodedStep:
    """A step's statistics vectors, decoded as arrays: row i of `numel`, `count`, `mean`, `m2` (clipped at 0),
    `lo`, `hi` (NaN without a finite value) and `zeros` is vector i's; `objects()` builds their TensorStats once.

    The vectors are stacked and every conversion is one numpy call over all of them, not one per tensor (a recorded
    step of a model with a hundred layers decodes several hundred vectors). Readers that want a step's scalars (the
    history, the NaN check) read these arrays, and the TensorStats objects are built only for a reader of the
    record (`decode.decode_step`). The histograms keep their counts in the step's arrays until they are read.
    """

    __slots__ = ("numel", "count", "mean", "m2", "lo", "hi", "zeros", "_metas", "_groups", "_objects")

    def __init__(self, vecs: Sequence[np.ndarray], metas: Sequence[StatsMeta]) -> None:
        k = len(vecs)
        # A step's vectors share a few meta objects (one per tensor size): grouped by meta in numpy, then by (bins,
        # the layout object) per distinct meta (hashing a Layout, a dataclass of slots, costs more than decoding).
        ids = np.fromiter(map(id, metas), dtype=np.int64, count=k)
        _, firsts, which = np.unique(ids, return_index=True, return_inverse=True)
        uniq = [metas[i] for i in firsts.tolist()]
        order = np.argsort(which, kind="stable")  # the vectors of each distinct meta together, in their order
        bounds = np.searchsorted(which[order], np.arange(len(uniq) + 1)).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        layouts: dict[int, Layout] = {}
        for u, meta in enumerate(uniq):
            lid = id(meta.layout)
            layouts[lid] = meta.layout
            groups.setdefault((meta.bins, lid), []).extend(order[bounds[u] : bounds[u + 1]].tolist())
        self.numel = np.array([meta.numel for meta in uniq], dtype=np.int64)[which]
        sampled_all = np.array([meta.sample_n < meta.numel for meta in uniq], dtype=bool)[which]
        self.count = np.empty(k, dtype=np.int64)
        self.zeros = np.empty(k, dtype=np.int64)
        self.mean, self.m2, self.lo, self.hi = (np.empty(k) for _ in range(4))
        self._metas = metas
        self._groups: list[tuple[list[int], Layout, np.ndarray, _StepHistograms]] = []
        self._objects: list[TensorStats] | None = None
        for (bins, lid), rows in groups.items():
            layout = layouts[lid]
            block = _stacked([vecs[i] for i in rows], layout.length(bins))
            count = np.rint(block[:, layout.index("count")]).astype(np.int64)
            self.count[rows] = count
            self.zeros[rows] = np.rint(block[:, layout.index("zero_count")]).astype(np.int64)
            lo, hi = block[:, layout.index("min")].copy(), block[:, layout.index("max")].copy()
            # Both histograms of every row stay in the block (exact integers in float64), shared by the group's
            # records; each record builds its Histogram and ExponentHistogram when they are read, converting only
            # that row (records._StepHistograms): most of a step's histograms are never read one by one.
            hists = _StepHistograms(
                block[:, layout.lin(bins)], block[:, layout.exp(bins)], lo, hi, count, sampled_all[rows]
            )
            m2 = block[:, layout.index("m2")]
            empty = count == 0
            self.mean[rows] = np.where(empty, math.nan, block[:, layout.index("mean")])
            self.m2[rows] = np.where(empty, math.nan, np.where(m2 > 0.0, m2, 0.0))
            self.lo[rows] = np.where(empty, math.nan, lo)
            self.hi[rows] = np.where(empty, math.nan, hi)
            self._groups.append((rows, layout, block, hists))

    def __len__(self) -> int:
        return len(self._metas)

    def nonfinite_count(self, i: int) -> int:
        """Row i's NaN/Inf count (`TensorStats.nonfinite_count`)."""
        return int(self.numel[i] - self.count[i])

    def histograms(self) -> list[tuple[_StepHistograms, int]]:
        """Per row: the step histograms that hold its counts, and its row there."""
        out: list[tuple[_StepHistograms, int]] = [None] * len(self)  # type: ignore[list-item]
        for rows, _, _, hists in self._groups:
            for j, i in enumerate(rows):
                out[i] = (hists, j)
        return out

    def objects(self) -> list[TensorStats]:
        """Every row's TensorStats, in the order of the vectors (built on the first call, then kept)."""
        if self._objects is not None:
            return self._objects
        metas = self._metas
        out: list[TensorStats] = [None] * len(metas)  # type: ignore[list-item]
        estimated: dict[int, tuple[str, ...]] = {}  # per meta object: most of a step's tensors share a few metas
        counts, zeros = self.count.tolist(), self.zeros.tolist()
        means, m2s, los, his = self.mean.tolist(), self.m2.tolist(), self.lo.tolist(), self.hi.tolist()
        for rows, layout, block, hists in self._groups:
            extra_names = [s.name for s in layout.extra]
            named = {name: block[:, layout.index(name)].tolist() for name in extra_names}
            for j, i in enumerate(rows):
                meta = metas[i]
                fields = estimated.get(id(meta))
                if fields is None:
                    fields = estimated[id(meta)] = meta.estimated_fields()
                extra = tuple((name, named[name][j]) for name in extra_names) if extra_names else ()
                count = counts[i]
                if count:
                    mean, m2, lo, hi = means[i], m2s[i], los[i], his[i]
                else:  # math.nan itself, as every other record without a finite value
                    mean = m2 = lo = hi = math.nan
                out[i] = _step_stats(meta.numel, count, mean, m2, lo, hi, zeros[i], hists, j, fields, extra)
        self._objects = out
        return out
