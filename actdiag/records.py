"""Plain, frozen records: what was measured, what it means, what to do about it.

Everything here is floats, ints, strings and tuples. Never tensors: a record outlives the step that produced it,
and holding a tensor would keep device memory (and possibly an autograd graph) alive.

Data flows one way: hooks -> records -> rules -> report -> sinks. The hooks produce `TensorStats`, `LayerStats` and
`ParamStats` (bundled per recorded step into a `StepRecord`); the rules turn them into `Finding`s; a `Report` bundles
the latest step, the per-step `History` and the findings for the sinks (JSON, HTML, TensorBoard, console).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

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


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts between consecutive `edges` (len(edges) == len(counts) + 1); the last bin includes its right edge.

    `sampled` is True when the counts come from a uniform sample of the tensor's elements rather than all of
    them (large tensors, see `actdiag.hooks`); then `sum(counts)` is the sample size, not the tensor's count.
    """

    edges: tuple[float, ...]
    counts: tuple[float, ...]
    sampled: bool = False

    @property
    def total(self) -> float:
        return float(sum(self.counts))


@dataclass(frozen=True, slots=True)
class ExponentHistogram:
    """Counts of finite non-zero values per power of two: `counts[i]` is for exponent `E_LOW + i`.

    Exponent e holds values with 2**(e-1) <= |x| < 2**e. The first bin also holds float32 subnormals.
    """

    counts: tuple[float, ...]
    sampled: bool = False

    @property
    def total(self) -> float:
        return float(sum(self.counts))

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


@dataclass(frozen=True, slots=True)
class TensorStats:
    """Statistics of one tensor at one recorded step, over its finite values.

    `count` is the number of finite values, `numel` all elements; `nonfinite_count == numel - count`.
    `std` is the population standard deviation (ddof=0). `m2` is the sum of squared deviations from the mean,
    kept so that statistics from several tensors (ranks, calls) merge exactly. With no finite value, mean, std,
    min, max and abs_max are NaN.

    `estimated` is True when m2 (so std), min, max and zero_count were estimated from the histogram's sample rather
    than computed over every element (`watch(exact=False)` on the CPU, large tensors only); count, the non-finite
    count and mean are exact either way.
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
    estimated: bool = False

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
    recorded step so far).
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

    @property
    def label(self) -> str:
        """Unique name within a step: the module name, with `#k` for the k-th repeated call (k >= 1)."""
        return self.name if self.call == 0 else f"{self.name}#{self.call}"


@dataclass(frozen=True, slots=True)
class ParamStats:
    """One parameter at one recorded step. `update_ratio` is ||w_after - w_before|| / ||w_before|| over the
    optimizer step of the recorded training step (None when updates are not tracked or the weight is zero)."""

    name: str
    shape: tuple[int, ...]
    requires_grad: bool
    weight: TensorStats
    grad: TensorStats | None = None
    update_ratio: float | None = None


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


@dataclass(frozen=True, slots=True)
class History:
    """Per-step scalar series, bounded in length (older points are thinned out as a run grows).

    `layers[label][metric]` and `params[name][metric]` are aligned with `steps`; NaN marks a step where the value
    was not recorded. Layer metrics: act_mean, act_std, act_abs_max, act_zero_fraction, act_nonfinite, grad_norm,
    grad_std, grad_abs_max, grad_nonfinite, saturation, dead_fraction, never_active_fraction, update_ratio.
    Param metrics: weight_norm, weight_std, grad_norm, update_ratio.
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

    def to_dict(self) -> dict[str, object]:
        from actdiag.reports.json import report_to_dict

        return report_to_dict(self)

    def worst_severity(self) -> Severity | None:
        if not self.findings:
            return None
        return max(self.findings, key=lambda f: f.rank).severity
