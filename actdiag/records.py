"""Plain, frozen records: what was measured, what it means, what to do about it.

Everything here is floats, ints, strings and tuples (a histogram may keep its counts as a row of its step's numpy array
until they are read, see `_Counts`). Never tensors: a record outlives the step that produced it, and holding a tensor
would keep device memory (and possibly an autograd graph) alive.

Data flows one way: hooks -> records -> rules -> report -> sinks. The hooks produce `TensorStats`, `LayerStats` and
`ParamStats` (bundled per recorded step into a `StepRecord`); the rules turn them into `Finding`s; a `Report` bundles
the latest step, the per-step `History` and the findings for the sinks (JSON, HTML, TensorBoard, console).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import os
    from pathlib import Path

Severity = Literal["info", "warning", "error"]
SEVERITY_RANK: Mapping[str, int] = {"info": 0, "warning": 1, "error": 2}

# Exponent histogram bins. Bin `e` counts finite, non-zero values with 2**(e-1) <= |x| < 2**e (the exponent that
# `math.frexp` returns). Values are binned from their float32 bit pattern, so every float32 value has a bin:
# E_LOW collects float32 subnormals (|x| < 2**-126) and E_HIGH is the largest float32 binade.
E_LOW = -126
E_HIGH = 128

FP16_MAX = 65504.0  # largest finite float16
FP16_MIN_SUBNORMAL_EXP = -24  # |x| < 2**-24 flushes to zero in float16
FP16_MIN_NORMAL_EXP = -14  # |x| < 2**-14 is subnormal in float16 (lost precision)


class _Counts:
    """Immutable counts that may be kept undecoded: a row of a 2-D integer numpy array shared by a whole recorded step
    (`_defer`), turned into a tuple the first time anything reads them.

    A recorded step decodes hundreds of histograms; most are never read one by one (a long run keeps a thinned
    selection, see `actdiag.history.HistoryBuffer`), and building their tuples of Python ints at every step, and
    collecting them as garbage, was a measurable part of a recorded step (docs/performance.md). Reading or comparing
    gives the same values either way; a deferred object keeps its step's array alive until it is read (`HistoryBuffer`
    reads those it keeps at once).
    """

    __slots__ = ("_counts", "_block", "_row", "sampled")

    _counts: tuple[float, ...] | None
    _block: Any
    _row: int
    sampled: bool

    def __init__(self, counts: Iterable[float], sampled: bool = False) -> None:
        self._fill(tuple(counts), None, 0, sampled)

    @classmethod
    def _defer(cls, block: Any, row: int, sampled: bool) -> Any:
        obj = cls.__new__(cls)
        obj._fill(None, block, row, sampled)
        return obj

    def _fill(self, counts: tuple[float, ...] | None, block: Any, row: int, sampled: bool) -> None:
        _set(self, "_counts", counts)
        _set(self, "_block", block)
        _set(self, "_row", row)
        _set(self, "sampled", sampled)

    @property
    def counts(self) -> tuple[float, ...]:
        if self._counts is None:
            _set(self, "_counts", tuple(_int_row(self._block[self._row]).tolist()))
            _set(self, "_block", None)  # the step's array is no longer needed by this object
        assert self._counts is not None
        return self._counts

    @property
    def total(self) -> float:
        if self._counts is None:
            return float(self._block[self._row].sum())
        return float(sum(self._counts))

    def _key(self) -> tuple[Any, ...]:
        return (self.counts, self.sampled)

    def _packed_counts(self) -> Any:
        """The counts as kept in a long-lived store: a copy of the row (not the step's array), or the tuple."""
        return _int_row(self._block[self._row]) if self._counts is None else self._counts

    def _pack(self) -> tuple[Any, ...]:
        """This object as a tuple of numbers, arrays and None: nothing the garbage collector tracks once the tuple
        has been through a collection (a history keeping thousands of histograms would otherwise hold thousands of
        tracked objects, and every full collection of the user's process walks them). `_unpack` inverts it."""
        return (self._packed_counts(), self.sampled)

    @classmethod
    def _unpack(cls, state: tuple[Any, ...]) -> Any:
        counts, sampled = state
        obj = cls.__new__(cls)
        obj._fill(tuple(counts.tolist()) if isinstance(counts, np.ndarray) else counts, None, 0, sampled)
        return obj

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")


_set = object.__setattr__  # the immutable classes' own way in


def _int_row(row: np.ndarray) -> np.ndarray:
    """A copy of a row of counts as int64: a decoded step keeps them in its float64 vectors (exact integers), and
    converts only the rows that are read."""
    return row.astype(np.int64) if row.dtype == np.int64 else np.rint(row).astype(np.int64)


class Histogram(_Counts):
    """Counts between consecutive `edges` (len(edges) == len(counts) + 1); the last bin includes its right edge.

    `sampled` is True when the counts come from a uniform sample of the tensor's elements rather than all of
    them (large tensors, see `actdiag.hooks`); then `sum(counts)` is the sample size, not the tensor's count.
    """

    __slots__ = ("_edges", "_lo", "_hi")

    _edges: tuple[float, ...] | None
    _lo: float
    _hi: float

    def __init__(self, edges: Iterable[float], counts: Iterable[float], sampled: bool = False) -> None:
        super().__init__(counts, sampled)
        self._span(tuple(edges), 0.0, 0.0)

    @classmethod
    def _even(cls, block: Any, row: int, lo: float, hi: float, sampled: bool) -> Histogram:
        """Deferred: counts are row `row` of `block`; the edges split [lo, hi] into len(counts) equal bins."""
        obj = cls._defer(block, row, sampled)
        obj._span(None, lo, hi)
        return obj

    def _span(self, edges: tuple[float, ...] | None, lo: float, hi: float) -> None:
        _set(self, "_edges", edges)
        _set(self, "_lo", lo)
        _set(self, "_hi", hi)

    @property
    def edges(self) -> tuple[float, ...]:
        if self._edges is None:
            bins = len(self.counts)
            step = (self._hi - self._lo) / bins
            # What np.linspace gives, the last edge exactly hi (as decoded before deferral existed).
            with np.errstate(invalid="ignore", over="ignore"):  # a span beyond float64 (-1e308 .. 1e308)
                edges = (self._lo + np.arange(bins + 1) * step).tolist()
            edges[-1] = self._hi
            _set(self, "_edges", tuple(edges))
        assert self._edges is not None
        return self._edges

    def _key(self) -> tuple[Any, ...]:
        return (self.edges, self.counts, self.sampled)

    def _pack(self) -> tuple[Any, ...]:
        return (self._packed_counts(), self.sampled, self._edges, self._lo, self._hi)

    @classmethod
    def _unpack(cls, state: tuple[Any, ...]) -> Any:
        counts, sampled, edges, lo, hi = state
        obj = super()._unpack((counts, sampled))
        obj._span(edges, lo, hi)
        return obj

    def __repr__(self) -> str:
        return f"Histogram(edges={self.edges!r}, counts={self.counts!r}, sampled={self.sampled!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Histogram, (self.edges, self.counts, self.sampled))


class ExponentHistogram(_Counts):
    """Counts of finite non-zero values per power of two: `counts[i]` is for exponent `E_LOW + i`.

    Exponent e holds values with 2**(e-1) <= |x| < 2**e. The first bin also holds float32 subnormals.
    """

    __slots__ = ()

    def fraction_at_least(self, exponent: int) -> float:
        """Fraction of the binned values with |x| >= 2**(exponent-1)."""
        total = self.total
        if total == 0:
            return 0.0
        start = max(0, exponent - E_LOW)
        return float(sum(self.counts[start:])) / total

    def fraction_below(self, exponent: int) -> float:
        """Fraction of the binned values with |x| < 2**(exponent-1)."""
        total = self.total
        if total == 0:
            return 0.0
        stop = max(0, min(len(self.counts), exponent - E_LOW))
        return float(sum(self.counts[:stop])) / total

    def nonzero_range(self) -> tuple[int, int] | None:
        """(lowest, highest) exponent with a non-zero count, or None when empty."""
        idx = [i for i, c in enumerate(self.counts) if c]
        if not idx:
            return None
        return E_LOW + idx[0], E_LOW + idx[-1]

    def __repr__(self) -> str:
        return f"ExponentHistogram(counts={self.counts!r}, sampled={self.sampled!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ExponentHistogram, (self.counts, self.sampled))


@dataclass(frozen=True, slots=True)
class TensorStats:
    """Statistics of one tensor at one recorded step, over its finite values.

    `count` is the number of finite values, `numel` all elements; `nonfinite_count == numel - count`.
    `std` is the population standard deviation (ddof=0). `m2` is the sum of squared deviations from the mean,
    kept so that statistics from several tensors (ranks, calls) merge exactly. With no finite value, mean, std,
    min, max and abs_max are NaN.

    `estimated` names the fields that come from the histogram's sample rather than from every element (e.g.
    ("std", "zero_fraction", "histogram")): only recording more often than every 10 steps, and only tensors over the
    sample (on the CPU, tensors over `actdiag.hooks.sampling.SMALL_SAMPLE` elements; on a GPU, over the sample cap).
    count, mean, min, max, abs_max and the non-finite count are exact at every interval (CONTRACT.md, "Exactness").
    `extra` holds the values of slots added to the statistics layout (`actdiag.hooks.layout.Layout.with_slot`).
    """

    numel: int
    count: int
    mean: float
    m2: float
    min: float
    max: float
    zero_count: int
    histogram: Histogram
    exponents: ExponentHistogram
    estimated: tuple[str, ...] = ()
    extra: tuple[tuple[str, float], ...] = ()

    @property
    def nonfinite_count(self) -> int:
        return self.numel - self.count

    @property
    def std(self) -> float:
        return math.sqrt(max(self.m2, 0.0) / self.count) if self.count else math.nan

    @property
    def var(self) -> float:
        return max(self.m2, 0.0) / self.count if self.count else math.nan

    @property
    def abs_max(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.count else math.nan

    @property
    def zero_fraction(self) -> float:
        return self.zero_count / self.numel if self.numel else 0.0

    @property
    def norm(self) -> float:
        """L2 norm of the finite values."""
        if not self.count:
            return 0.0
        return math.sqrt(max(self.m2, 0.0) + self.count * self.mean * self.mean)

    @property
    def rms(self) -> float:
        """Root mean square of the finite values."""
        return self.norm / math.sqrt(self.count) if self.count else math.nan


class _StepHistograms:
    """Both histograms of many tensors of one decoded step, as arrays: row r of `lin` (linear counts between
    `lo[r]` and `hi[r]`, the tensor's finite min and max) and of `exp` (exponent counts; integers, or exact integers
    in float64 converted per row when read: `_int_row`), `sampled[r]`, and
    `count[r]`, its finite values. A tensor without any has one empty bin on [0, 1]; a constant one (min == max) one
    bin of width 1 centred on its value.

    A decoded `TensorStats` keeps this shared object and its row, and builds its `Histogram` and
    `ExponentHistogram` each time they are read (`_step_stats`). A step of a deep model has thousands of tensors:
    two objects each, kept as long as the record, were most of the objects a recorded step left for the garbage
    collector, whose full collections walk every one of them (docs/performance.md). Built on reading and then
    dropped, they die by their reference count instead. numpy arrays are not tracked by the collector.
    """

    __slots__ = ("lin", "exp", "lo", "hi", "count", "sampled")

    def __init__(
        self, lin: np.ndarray, exp: np.ndarray, lo: np.ndarray, hi: np.ndarray, count: np.ndarray, sampled: np.ndarray
    ) -> None:
        self.lin, self.exp, self.lo, self.hi, self.count, self.sampled = lin, exp, lo, hi, count, sampled

    def histogram(self, row: int) -> Histogram:
        lo, hi, sampled = float(self.lo[row]), float(self.hi[row]), bool(self.sampled[row])
        if not self.count[row]:
            return Histogram(edges=(0.0, 1.0), counts=(0,), sampled=sampled)
        if hi > lo:
            return Histogram._even(self.lin, row, lo, hi, sampled)
        return Histogram(edges=(lo - 0.5, lo + 0.5), counts=(int(self.lin[row].sum()),), sampled=sampled)

    def exponents(self, row: int) -> ExponentHistogram:
        return ExponentHistogram._defer(self.exp, row, bool(self.sampled[row]))

    def packed(self, row: int) -> tuple[Any, Any]:
        """Row `row`'s (histogram, exponents) as `_Counts._pack` gives them, without building either."""
        sampled = bool(self.sampled[row])
        exp = (_int_row(self.exp[row]), sampled)
        lo, hi = float(self.lo[row]), float(self.hi[row])
        if self.count[row] and hi > lo:  # what Histogram._even's _pack gives
            return (_int_row(self.lin[row]), sampled, None, lo, hi), exp
        return self.histogram(row)._pack(), exp

    def packed_exponents(self, row: int) -> Any:
        return (_int_row(self.exp[row]), bool(self.sampled[row]))


# TensorStats' `histogram` and `exponents` fields, read through the slots that store them: a decoded record stores
# its step's `_StepHistograms` in the first and its row in the second; one built from Histogram objects stores those.
_HISTOGRAM_SLOT = TensorStats.__dict__["histogram"]
_EXPONENTS_SLOT = TensorStats.__dict__["exponents"]


def _read_histogram(stats: TensorStats) -> Histogram:
    held = _HISTOGRAM_SLOT.__get__(stats)
    return held.histogram(_EXPONENTS_SLOT.__get__(stats)) if type(held) is _StepHistograms else held


def _read_exponents(stats: TensorStats) -> ExponentHistogram:
    held, stored = _HISTOGRAM_SLOT.__get__(stats), _EXPONENTS_SLOT.__get__(stats)
    return held.exponents(stored) if type(held) is _StepHistograms else stored


# Replacing the slot descriptors keeps TensorStats a plain frozen dataclass to every reader: its fields, __init__,
# equality, hash, repr, pickling and dataclasses.replace all go through these properties (a frozen dataclass's
# __init__ sets its fields with object.__setattr__, which reaches the setters).
setattr(TensorStats, "histogram", property(_read_histogram, _HISTOGRAM_SLOT.__set__))  # noqa: B010
setattr(TensorStats, "exponents", property(_read_exponents, _EXPONENTS_SLOT.__set__))  # noqa: B010


def _step_stats(
    numel: int,
    count: int,
    mean: float,
    m2: float,
    min: float,
    max: float,
    zero_count: int,
    histograms: _StepHistograms,
    row: int,
    estimated: tuple[str, ...],
    extra: tuple[tuple[str, float], ...],
) -> TensorStats:
    """A TensorStats whose histograms are row `row` of a step's `histograms`, built when read."""
    return TensorStats(numel, count, mean, m2, min, max, zero_count, histograms, row, estimated, extra)  # type: ignore[arg-type]


def _packed_histograms(stats: TensorStats) -> tuple[Any, Any]:
    """`stats`' (histogram, exponents) packed for a long-lived store (`_Counts._pack`); a step's rows are packed
    without building the objects (a history packs several per layer at every step it keeps)."""
    held = _HISTOGRAM_SLOT.__get__(stats)
    if type(held) is not _StepHistograms:
        return held._pack(), _EXPONENTS_SLOT.__get__(stats)._pack()
    return held.packed(_EXPONENTS_SLOT.__get__(stats))


def _packed_exponents(stats: TensorStats) -> Any:
    """`stats.exponents` packed for a long-lived store (`_Counts._pack`)."""
    held = _HISTOGRAM_SLOT.__get__(stats)
    if type(held) is not _StepHistograms:
        return _EXPONENTS_SLOT.__get__(stats)._pack()
    return held.packed_exponents(_EXPONENTS_SLOT.__get__(stats))


@dataclass(frozen=True, slots=True)
class UnitActivity:
    """How long the units of a ReLU-family layer call have been silent (no positive output for any sample), over
    the recorded calls of the whole watch (`actdiag.hooks.tracking`).

    `silent[s]` counts the units silent in their latest `s` recorded calls and active in the one before (s = 0:
    active in the latest call); the last entry pools every longer streak. `since[s]` is the recorded step from which
    the units of `silent[s]` have been silent. `never` counts units never active in any recorded call (silent since
    initialisation), `calls` the layer call's recorded calls so far, `examples` (unit index, streak) of the
    longest-silent units.
    """

    silent: tuple[int, ...]
    since: tuple[int, ...]
    never: int
    calls: int
    examples: tuple[tuple[int, int], ...] = ()

    def silent_for_at_least(self, k: int) -> int:
        """Units silent in each of their latest `k` recorded calls (k beyond the pooled bin reads as that bin)."""
        return sum(self.silent[min(max(k, 0), len(self.silent) - 1) :])


@dataclass(frozen=True, slots=True)
class LayerStats:
    """What one module call produced at one recorded step.

    `name` is the qualified name from `model.named_modules()`; a module called several times in one forward
    pass gives one record per call (`call` 0, 1, ...). `activation` describes the module's output (its first
    tensor, for tuple/dict outputs), `gradient` the gradient of the loss with respect to that output.
    `weight`/`weight_grad` are the stats of the module's own `weight` parameter (or its first own parameter).

    Bounded activations (tanh, sigmoid, hardtanh, ...) carry `bounds` and `saturation`: the fraction of outputs
    within the saturation tolerance of a bound. ReLU-family outputs carry `units` (features or channels) and
    `dead_fraction` (units with no positive output for any sample of this step), `rare_fraction` (units positive
    for under 1% of this step's samples) and `never_active_fraction` (units with no positive output in any
    recorded step so far). `activity` says for how many recorded calls each unit has been silent (the rules' dead
    units over a window); `input_nonfinite` is the NaN/Inf count of the input of the step's first module call (the
    model's input), `input_grad_nonfinite` that of the gradient with respect to the module's input.

    `output` is True for the calls whose outputs are the model's output or, through the autograd graph, the nearest
    recorded ones it is computed from (the head; every call of a head applied several times). A functional
    activation's record is named `<enclosing module>:<function>` and has the type of its module (`ReLU`, `Tanh`).
    """

    name: str
    type: str
    step: int
    call: int = 0
    shape: tuple[int, ...] = ()
    dtype: str = ""
    activation: TensorStats | None = None
    gradient: TensorStats | None = None
    weight: TensorStats | None = None
    weight_grad: TensorStats | None = None
    weight_name: str | None = None
    bounds: tuple[float, float] | None = None
    saturation: float | None = None
    units: int | None = None
    dead_fraction: float | None = None
    rare_fraction: float | None = None
    never_active_fraction: float | None = None
    update_ratio: float | None = None
    update_ratio_estimated: bool = False
    activity: UnitActivity | None = None
    input_nonfinite: int | None = None
    input_grad_nonfinite: int | None = None
    output: bool = False

    @property
    def label(self) -> str:
        """Unique name within a step: the module name, with `#k` for the k-th repeated call (k >= 1)."""
        return layer_label(self.name, self.call)


def layer_label(name: str, call: int) -> str:
    """`LayerStats.label` of call `call` of module `name`."""
    return name if call == 0 else f"{name}#{call}"


@dataclass(frozen=True, slots=True)
class LostUpdates:
    """Of the elements of a float16/bfloat16 parameter whose gradient was non-zero at a recorded step (`nonzero`),
    how many the optimizer step left exactly unchanged (`unchanged`): their update was below half the spacing
    between neighbouring values of `dtype` and rounded away. Over a fixed sample of a large weight when
    `estimated` (as the update ratio)."""

    unchanged: int
    nonzero: int
    dtype: str
    estimated: bool = False

    @property
    def fraction(self) -> float:
        return self.unchanged / self.nonzero if self.nonzero else 0.0


@dataclass(frozen=True, slots=True)
class ParamStats:
    """One parameter at one recorded step. `update_ratio` is ||w_after - w_before|| / ||w_before|| over the
    optimizer step of the recorded training step (None when updates are not tracked or the weight is zero),
    over every element, or over a fixed sample of a large weight when `update_ratio_estimated`. `lr` and
    `optimizer` are the learning rate and the optimizer class (e.g. "AdamW") of that step, None when no optimizer
    stepped the parameter while the step was recorded."""

    name: str
    shape: tuple[int, ...]
    requires_grad: bool
    weight: TensorStats
    grad: TensorStats | None = None
    update_ratio: float | None = None
    update_ratio_estimated: bool = False
    lr: float | None = None
    optimizer: str | None = None
    lost_updates: LostUpdates | None = None  # float16/bfloat16 parameters, when updates are tracked


def measured_stats(layers: Iterable[LayerStats], params: Iterable[ParamStats]) -> list[TensorStats]:
    """Every tensor a step measured: each layer's output and output gradient, each parameter and its gradient."""
    found = [s for layer in layers for s in (layer.activation, layer.gradient) if s is not None]
    return found + [s for p in params for s in (p.weight, p.grad) if s is not None]


@dataclass(frozen=True, slots=True)
class StepRecord:
    """Everything recorded at one training step, in forward execution order."""

    step: int
    layers: tuple[LayerStats, ...]
    params: tuple[ParamStats, ...] = ()


class _Deferred:
    """The layers and params of a recorded step, built when first read (`deferred_record`), and the step's
    `scalars` for the readers that need only those (the history, the NaN check).

    A deep model's recorded step has thousands of TensorStats, LayerStats and ParamStats objects; at every step
    (`watch(every=1)`) building them was a large share of what recording cost (BENCHMARKS.md), while a run without
    a sink reads them only for the last step's report. `build` reads nothing that changes after the step: the
    recorder hands it arrays and values of that step alone. The lock makes one build of a record read from two
    threads (the TensorBoard sink's writer and the training loop).
    """

    __slots__ = ("build", "scalars", "lock")

    def __init__(self, build: Any, scalars: Any) -> None:
        self.build, self.scalars, self.lock = build, scalars, threading.Lock()


_LAYERS_SLOT = StepRecord.__dict__["layers"]
_PARAMS_SLOT = StepRecord.__dict__["params"]


def _built(record: StepRecord, held: _Deferred) -> tuple[tuple[LayerStats, ...], tuple[ParamStats, ...]]:
    with held.lock:
        if _LAYERS_SLOT.__get__(record) is held:
            layers, params = held.build()
            _LAYERS_SLOT.__set__(record, layers)
            _PARAMS_SLOT.__set__(record, params)
    return _LAYERS_SLOT.__get__(record), _PARAMS_SLOT.__get__(record)


def _read_layers(record: StepRecord) -> tuple[LayerStats, ...]:
    held = _LAYERS_SLOT.__get__(record)
    return _built(record, held)[0] if type(held) is _Deferred else held


def _read_params(record: StepRecord) -> tuple[ParamStats, ...]:
    held = _PARAMS_SLOT.__get__(record)
    return _built(record, held)[1] if type(held) is _Deferred else held


# As TensorStats' histograms above: to every reader StepRecord stays a plain frozen dataclass (fields, equality,
# repr, pickling, dataclasses.replace all read through these properties).
setattr(StepRecord, "layers", property(_read_layers, _LAYERS_SLOT.__set__))  # noqa: B010
setattr(StepRecord, "params", property(_read_params, _PARAMS_SLOT.__set__))  # noqa: B010


def deferred_record(step: int, build: Any, scalars: Any) -> StepRecord:
    """A StepRecord whose layers and params `build()` returns when first read; `scalars` (whatever the caller
    computed from the step's arrays) is `pending_scalars`' until then."""
    record = StepRecord(step=step, layers=(), params=())
    held = _Deferred(build, scalars)
    _LAYERS_SLOT.__set__(record, held)
    _PARAMS_SLOT.__set__(record, held)
    return record


def pending_scalars(record: StepRecord) -> Any:
    """The `scalars` of a deferred record whose layers are not built yet; None otherwise."""
    held = _LAYERS_SLOT.__get__(record)
    return held.scalars if type(held) is _Deferred else None


@dataclass(frozen=True, slots=True)
class History:
    """Per-step scalar series, bounded in length (older points are thinned out as a run grows).

    `layers[label][metric]` and `params[name][metric]` are aligned with `steps`; NaN marks a step where the value
    was not recorded. Layer metrics: act_mean, act_std, act_abs_max, act_zero_fraction, act_nonfinite, grad_norm,
    grad_std, grad_abs_max, grad_nonfinite, saturation, dead_fraction, never_active_fraction, update_ratio.
    Param metrics: weight_norm, weight_std, grad_norm, update_ratio, lr.
    `activation_histograms[label]` is aligned with `hist_steps` (None where the layer was not recorded).
    """

    steps: tuple[int, ...] = ()
    layers: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)
    params: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)
    hist_steps: tuple[int, ...] = ()
    activation_histograms: Mapping[str, tuple[Histogram | None, ...]] = field(default_factory=dict)
    activation_exponents: Mapping[str, tuple[ExponentHistogram | None, ...]] = field(default_factory=dict)
    gradient_exponents: Mapping[str, tuple[ExponentHistogram | None, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fix:
    """A remedy for a finding. `snippet` is code the user can paste, naming their own layers.

    `verified` is True/False when actdiag re-ran a copy of the model with the fix applied and the finding went
    away/stayed, None when not tried. `before`/`after` hold the evidence of that re-run.
    """

    code: str
    text: str
    snippet: str = ""
    verified: bool | None = None
    before: Mapping[str, float] = field(default_factory=dict)
    after: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Finding:
    """A diagnosis: what is wrong, where, the numbers behind it, and what to do.

    `layer` is the qualified module name, or None for the whole model. `related` lists other layers showing the
    same root cause (grouped so one cause gives one finding, not twenty).
    """

    code: str
    severity: Severity
    layer: str | None
    message: str
    evidence: Mapping[str, float] = field(default_factory=dict)
    fixes: tuple[Fix, ...] = ()
    related: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return SEVERITY_RANK[self.severity]

    def __repr__(self) -> str:
        from actdiag.reports.notebook import finding_repr

        return finding_repr(self)

    def _repr_html_(self) -> str:
        from actdiag.reports.notebook import finding_html

        return finding_html(self)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    parameters: int
    trainable_parameters: int = 0


@dataclass(frozen=True, slots=True)
class RunInfo:
    steps: int
    recorded_steps: int
    device: str
    torch: str
    actdiag: str
    every: int = 1


@dataclass(frozen=True, slots=True)
class Report:
    """What the sinks read: the latest recorded step, its history and the ranked findings."""

    model: ModelInfo
    run: RunInfo
    layers: tuple[LayerStats, ...]
    params: tuple[ParamStats, ...] = ()
    findings: tuple[Finding, ...] = ()
    history: History | None = None

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        from actdiag.reports.json import save_json

        return save_json(self, path)

    def save_html(self, path: str | os.PathLike[str]) -> Path:
        from actdiag.reports.html import save_html

        return save_html(self, path)

    def __repr__(self) -> str:  # a one-liner: the records are one attribute away, and a notebook gets _repr_html_
        from actdiag.reports.notebook import report_repr

        return report_repr(self)

    def _repr_html_(self) -> str:
        from actdiag.reports.notebook import report_html

        return report_html(self)
