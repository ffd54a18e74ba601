"""The per-step series a `History` keeps, by name: one vocabulary for the history, the rules and the sinks.

`History.layers[label][ACT_STD]` is the series of a layer's activation spread; `History.params[name][UPDATE_RATIO]`
a parameter's update ratios. A rule that reads a series and the TensorBoard sink that plots it use these names, so
renaming or adding a series is one edit here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from actdiag.records import (
    LayerStats,
    ParamStats,
    StepRecord,
    _packed_exponents,
    _packed_histograms,
    measured_stats,
    pending_scalars,
)

# Per layer (module call).
ACT_MEAN = "act_mean"
ACT_STD = "act_std"
ACT_ABS_MAX = "act_abs_max"
ACT_ZERO_FRACTION = "act_zero_fraction"
ACT_NONFINITE = "act_nonfinite"
GRAD_NORM = "grad_norm"  # also per parameter
GRAD_STD = "grad_std"
GRAD_ABS_MAX = "grad_abs_max"
GRAD_NONFINITE = "grad_nonfinite"
SATURATION = "saturation"
DEAD_FRACTION = "dead_fraction"
NEVER_ACTIVE_FRACTION = "never_active_fraction"
UPDATE_RATIO = "update_ratio"  # also per parameter
# Per parameter.
WEIGHT_NORM = "weight_norm"
WEIGHT_STD = "weight_std"
LR = "lr"  # the learning rate the optimizer stepped the parameter with (NaN when none was seen)

LAYER_METRICS = (
    ACT_MEAN,
    ACT_STD,
    ACT_ABS_MAX,
    ACT_ZERO_FRACTION,
    ACT_NONFINITE,
    GRAD_NORM,
    GRAD_STD,
    GRAD_ABS_MAX,
    GRAD_NONFINITE,
    SATURATION,
    DEAD_FRACTION,
    NEVER_ACTIVE_FRACTION,
    UPDATE_RATIO,
)
PARAM_METRICS = (WEIGHT_NORM, WEIGHT_STD, GRAD_NORM, UPDATE_RATIO, LR)


def _opt(v: float | None) -> float:
    return math.nan if v is None else float(v)


def layer_metrics(layer: LayerStats) -> dict[str, float]:
    """Every LAYER_METRICS value of one layer at one step, NaN where it does not apply."""
    a, g = layer.activation, layer.gradient
    return {
        ACT_MEAN: a.mean if a else math.nan,
        ACT_STD: a.std if a else math.nan,
        ACT_ABS_MAX: a.abs_max if a else math.nan,
        ACT_ZERO_FRACTION: a.zero_fraction if a else math.nan,
        ACT_NONFINITE: float(a.nonfinite_count) if a else math.nan,
        GRAD_NORM: g.norm if g else math.nan,
        GRAD_STD: g.std if g else math.nan,
        GRAD_ABS_MAX: g.abs_max if g else math.nan,
        GRAD_NONFINITE: float(g.nonfinite_count) if g else math.nan,
        SATURATION: _opt(layer.saturation),
        DEAD_FRACTION: _opt(layer.dead_fraction),
        NEVER_ACTIVE_FRACTION: _opt(layer.never_active_fraction),
        UPDATE_RATIO: _opt(layer.update_ratio),
    }


def param_metrics(param: ParamStats) -> dict[str, float]:
    """Every PARAM_METRICS value of one parameter at one step, NaN where it does not apply."""
    return {
        WEIGHT_NORM: param.weight.norm,
        WEIGHT_STD: param.weight.std,
        GRAD_NORM: param.grad.norm if param.grad else math.nan,
        UPDATE_RATIO: _opt(param.update_ratio),
        LR: _opt(param.lr),
    }


@dataclass(frozen=True, slots=True)
class StepScalars:
    """One recorded step's series values, as arrays: row i of `layers` holds `LAYER_METRICS` (in that order) of
    the layer call labelled `labels[i]`, row j of `params` `PARAM_METRICS` of parameter `names[j]`; `nonfinite`:
    whether any measured tensor holds NaN/Inf. `histograms()`: per layer label, its activation histogram,
    activation exponents and gradient exponents packed for the history (`records._Counts._pack`; None where the
    layer has none)."""

    labels: tuple[str, ...]
    layers: np.ndarray
    names: tuple[str, ...]
    params: np.ndarray
    nonfinite: bool
    histograms: Callable[[], tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]


def step_scalars(record: StepRecord) -> StepScalars:
    """The step's `StepScalars`: those the recorder computed from the step's arrays while its records are not built
    (`records.deferred_record`), otherwise from the records (the same values)."""
    pending = pending_scalars(record)
    if pending is not None:
        return pending
    layers, params = record.layers, record.params
    lrows = [[row[m] for m in LAYER_METRICS] for row in map(layer_metrics, layers)]
    prows = [[row[m] for m in PARAM_METRICS] for row in map(param_metrics, params)]
    return StepScalars(
        labels=tuple(layer.label for layer in layers),
        layers=np.array(lrows, dtype=np.float64).reshape(len(lrows), len(LAYER_METRICS)),
        names=tuple(p.name for p in params),
        params=np.array(prows, dtype=np.float64).reshape(len(prows), len(PARAM_METRICS)),
        nonfinite=any_nonfinite(record),
        histograms=partial(_packed_layer_histograms, layers),
    )


def any_nonfinite(record: StepRecord) -> bool:
    """Whether anything the step measured holds NaN/Inf (from its scalars while its records are not built)."""
    pending = pending_scalars(record)
    if pending is not None:
        return bool(pending.nonfinite)
    return any(s.nonfinite_count > 0 for s in measured_stats(record.layers, record.params))


def _packed_layer_histograms(
    layers: tuple[LayerStats, ...],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """`StepScalars.histograms` of built records. Packed (flat tuples of numbers, None and a copy of the counts'
    row), they hold none of the step's arrays, and the collector stops tracking them at their first collection (a
    tuple of tuples needs a second one); `History` builds the histograms."""
    hists: dict[str, Any] = {}
    aexps: dict[str, Any] = {}
    gexps: dict[str, Any] = {}
    for layer in layers:
        a, g, label = layer.activation, layer.gradient, layer.label
        hists[label], aexps[label] = _packed_histograms(a) if a else (None, None)
        gexps[label] = _packed_exponents(g) if g else None
    return hists, aexps, gexps
