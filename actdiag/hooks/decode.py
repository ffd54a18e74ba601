"""From a recorded step's vectors to a StepRecord: one read-back per device, then decoding by key.

The recorder collects, per step, a vector (and its meta) under a `Key` for every measured tensor and count; this
module copies them to the host in one transfer per device and turns them into the frozen records of
`actdiag.records`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch

from actdiag.hooks.keys import Key, layer_keys, param_keys
from actdiag.hooks.layout import DecodedStep, StatsMeta
from actdiag.hooks.tracking import UnitStreaks
from actdiag.metrics import (
    ACT_ABS_MAX,
    ACT_MEAN,
    ACT_NONFINITE,
    ACT_STD,
    ACT_ZERO_FRACTION,
    DEAD_FRACTION,
    GRAD_ABS_MAX,
    GRAD_NONFINITE,
    GRAD_NORM,
    GRAD_STD,
    LAYER_METRICS,
    LR,
    NEVER_ACTIVE_FRACTION,
    PARAM_METRICS,
    SATURATION,
    UPDATE_RATIO,
    WEIGHT_NORM,
    WEIGHT_STD,
    StepScalars,
)
from actdiag.records import (
    LayerStats,
    LostUpdates,
    ParamStats,
    StepRecord,
    TensorStats,
    deferred_record,
    layer_label,
)


@dataclass(slots=True)
class LayerCall:
    """What the recorder knows of one call of a measured layer before its vectors are read back."""

    name: str
    type: str
    call: int
    shape: tuple[int, ...]
    dtype: str
    weight_name: str | None
    bounds: tuple[float, float] | None = None
    units: int | None = None
    sat_numel: int = 0
    output: bool = False


def decode_step(
    host: Mapping[Key, tuple[np.ndarray, Any]],
    order: Sequence[LayerCall],
    aliases: Mapping[Key, Key],
    input_from: Mapping[tuple[str, int], Key] | None,
    *,
    step: int,
    named_params: Sequence[tuple[str, torch.Tensor]],
    streaks: UnitStreaks,
    update_sampled: Callable[[int], bool],
    optimizers: Mapping[str, tuple[float, str]] | None = None,
) -> StepRecord:
    """A recorded step's host vectors (by key) as a StepRecord: statistics decoded through the layout, parameters
    with their update ratios and lost-update counts, layers in forward order with their unit-health shares.

    What the step's readers need at every step (the history's scalars and histograms, the NaN check) is computed
    here from the step's arrays (`StepScalars`); the TensorStats, ParamStats and LayerStats objects are built when
    the record's layers or params are first read (`records.deferred_record`), from values taken here: nothing the
    build reads changes after this call (the parameters' shapes and flags, the units' streak tracks)."""
    keys = [k for k, (_, meta) in host.items() if isinstance(meta, StatsMeta)]
    block = DecodedStep([host[k][0] for k in keys], [host[k][1] for k in keys])
    index = {k: i for i, k in enumerate(keys)}

    def at(key: Key) -> int:
        """The row of `key`'s statistics in `block`, -1 for none."""
        return index.get(aliases.get(key, key), -1)

    seen = optimizers or {}
    params: list[_Param] = []
    by_name: dict[str, _Param] = {}
    for pname, p in named_params:
        pkeys = param_keys(pname)
        w = at(pkeys.weight)
        if w < 0:
            continue
        upd = host.get(pkeys.update)
        ratio = None
        if upd is not None:
            delta, norm0 = upd[0].tolist()  # updates.UpdateRatios: the two norms
            ratio = delta / norm0 if norm0 > 0 and math.isfinite(norm0) else None
        counts = host.get(pkeys.lost)
        lost = None
        if counts is not None:
            unchanged, nonzero = (int(v) for v in counts[0])  # updates.LostUpdateCounts
            dtype = str(p.dtype).replace("torch.", "")
            lost = LostUpdates(unchanged, nonzero, dtype, update_sampled(p.numel()))
        lr, optimizer = seen.get(pname, (None, None))
        estimated = ratio is not None and update_sampled(p.numel())
        param = _Param(pname, tuple(p.shape), p.requires_grad, w, at(pkeys.grad), ratio, estimated, lost, lr, optimizer)
        params.append(param)
        by_name[pname] = param
    layers: list[_Layer] = []
    for info in order:
        name, call = info.name, info.call
        lkeys = layer_keys(name, call)
        saturation = dead = rare = never = None
        sat = host.get(lkeys.sat)
        if sat is not None and sat[1]:
            saturation = float(sat[0][0]) / float(sat[1])  # meta: elements counted (all ranks' when merged)
        units = host.get(lkeys.units)
        activity = None
        if units is not None and info.units:
            dead, rare, never = (v / info.units for v in units[0][:3].tolist())
            streak = host.get(lkeys.streak)
            if streak is not None:  # built with the record; the track's state as it is now
                activity = (streak[0], int(units[0][2]), *streaks.state(name, call))
        inp = host.get(lkeys.input)
        ingrad = host.get(lkeys.ingrad)
        src = (input_from or {}).get((name, call))
        src_grad = at(layer_keys(src.name, src.call).grad) if src is not None else -1
        if ingrad is not None:
            in_grad: int | None = int(ingrad[0][0])
        else:  # the input is an earlier call's output: its gradient's count
            in_grad = block.nonfinite_count(src_grad) if src_grad >= 0 else None
        wp = by_name.get(info.weight_name) if info.weight_name else None
        layers.append(
            _Layer(
                info,
                at(lkeys.act),
                at(lkeys.grad),
                wp,
                saturation,
                dead,
                rare,
                never,
                activity,
                int(inp[0][0]) if inp is not None else None,
                in_grad,
            )
        )
    scalars = _scalars(block, layers, params)
    return deferred_record(step, partial(_build, block, step, layers, params, streaks), scalars)


class _Param(NamedTuple):
    """What a ParamStats is built from (`decode_step`): rows of the step's `DecodedStep`, -1 for none."""

    name: str
    shape: tuple[int, ...]
    requires_grad: bool
    weight: int
    grad: int
    update_ratio: float | None
    update_ratio_estimated: bool
    lost_updates: LostUpdates | None
    lr: float | None
    optimizer: str | None


class _Layer(NamedTuple):
    """What a LayerStats is built from (`decode_step`)."""

    info: LayerCall
    act: int
    grad: int
    weight: _Param | None
    saturation: float | None
    dead: float | None
    rare: float | None
    never: float | None
    activity: tuple[np.ndarray, int, int, tuple[int, ...]] | None  # UnitStreaks.activity's arguments
    input_nonfinite: int | None
    input_grad_nonfinite: int | None


def _build(
    block: DecodedStep, step: int, layers: list[_Layer], params: list[_Param], streaks: UnitStreaks
) -> tuple[tuple[LayerStats, ...], tuple[ParamStats, ...]]:
    """The record's layers and params (`decode_step`): one TensorStats per row of the step, shared by every key
    measured as another's tensor and by a layer and its weight."""
    stats = block.objects()

    def at(i: int) -> TensorStats | None:
        return stats[i] if i >= 0 else None

    built: dict[str, ParamStats] = {}
    for p in params:
        built[p.name] = ParamStats(
            name=p.name,
            shape=p.shape,
            requires_grad=p.requires_grad,
            weight=stats[p.weight],
            grad=at(p.grad),
            update_ratio=p.update_ratio,
            update_ratio_estimated=p.update_ratio_estimated,
            lost_updates=p.lost_updates,
            lr=p.lr,
            optimizer=p.optimizer,
        )
    out = []
    for lay in layers:
        info, wp = lay.info, lay.weight
        ps = built[wp.name] if wp is not None else None
        out.append(
            LayerStats(
                name=info.name,
                type=info.type,
                step=step,
                call=info.call,
                shape=info.shape,
                dtype=info.dtype,
                activation=at(lay.act),
                gradient=at(lay.grad),
                weight=ps.weight if ps else None,
                weight_grad=ps.grad if ps else None,
                weight_name=info.weight_name if ps else None,
                bounds=info.bounds,
                saturation=lay.saturation,
                units=info.units,
                dead_fraction=lay.dead,
                rare_fraction=lay.rare,
                never_active_fraction=lay.never,
                update_ratio=ps.update_ratio if ps else None,
                update_ratio_estimated=ps.update_ratio_estimated if ps else False,
                activity=streaks.activity(*lay.activity) if lay.activity is not None else None,
                input_nonfinite=lay.input_nonfinite,
                input_grad_nonfinite=lay.input_grad_nonfinite,
                output=info.output,
            )
        )
    return tuple(out), tuple(built.values())


def _scalars(block: DecodedStep, layers: list[_Layer], params: list[_Param]) -> StepScalars:
    """The step's `StepScalars` from its arrays: what `metrics.layer_metrics` and `param_metrics` give for each
    built record (the same float64 operations, so the same values)."""
    nan = math.nan
    count = block.count.astype(np.float64)
    numel = block.numel.astype(np.float64)
    m2, mean, lo, hi = block.m2, block.mean, block.lo, block.hi
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.where(count > 0, np.sqrt(m2 / count), nan)
        norm = np.where(count > 0, np.sqrt(m2 + count * mean * mean), 0.0)
    # TensorStats' properties of every row, each with a trailing NaN that index -1 (no such tensor) reads.
    stat = {
        name: np.append(values, nan)
        for name, values in (
            ("mean", mean),
            ("std", std),
            ("abs_max", np.where(count > 0, np.maximum(np.abs(lo), np.abs(hi)), nan)),
            ("zero_fraction", np.divide(block.zeros, numel, out=np.zeros(len(block)), where=numel > 0)),
            ("nonfinite", numel - count),
            ("norm", norm),
        )
    }
    act = np.array([lay.act for lay in layers], dtype=np.int64)
    grad = np.array([lay.grad for lay in layers], dtype=np.int64)
    weight = np.array([p.weight for p in params], dtype=np.int64)
    pgrad = np.array([p.grad for p in params], dtype=np.int64)

    def opt(values: list[float | None]) -> np.ndarray:
        return np.array([nan if v is None else v for v in values], dtype=np.float64)

    by_layer = {
        ACT_MEAN: stat["mean"][act],
        ACT_STD: stat["std"][act],
        ACT_ABS_MAX: stat["abs_max"][act],
        ACT_ZERO_FRACTION: stat["zero_fraction"][act],
        ACT_NONFINITE: stat["nonfinite"][act],
        GRAD_NORM: stat["norm"][grad],
        GRAD_STD: stat["std"][grad],
        GRAD_ABS_MAX: stat["abs_max"][grad],
        GRAD_NONFINITE: stat["nonfinite"][grad],
        SATURATION: opt([lay.saturation for lay in layers]),
        DEAD_FRACTION: opt([lay.dead for lay in layers]),
        NEVER_ACTIVE_FRACTION: opt([lay.never for lay in layers]),
        UPDATE_RATIO: opt([lay.weight.update_ratio if lay.weight else None for lay in layers]),
    }
    by_param = {
        WEIGHT_NORM: stat["norm"][weight],
        WEIGHT_STD: stat["std"][weight],
        GRAD_NORM: stat["norm"][pgrad],
        UPDATE_RATIO: opt([p.update_ratio for p in params]),
        LR: opt([p.lr for p in params]),
    }
    lvals = np.column_stack([by_layer[m] for m in LAYER_METRICS]).reshape(len(layers), len(LAYER_METRICS))
    pvals = np.column_stack([by_param[m] for m in PARAM_METRICS]).reshape(len(params), len(PARAM_METRICS))
    measured = np.array(
        [i for lay in layers for i in (lay.act, lay.grad)] + [i for p in params for i in (p.weight, p.grad)],
        dtype=np.int64,
    )
    measured = measured[measured >= 0]
    labels = tuple(layer_label(lay.info.name, lay.info.call) for lay in layers)
    return StepScalars(
        labels=labels,
        layers=lvals,
        names=tuple(p.name for p in params),
        params=pvals,
        nonfinite=bool((stat["nonfinite"][measured] > 0).any()),
        histograms=partial(_histograms, block, labels, layers),
    )


def _histograms(
    block: DecodedStep, labels: tuple[str, ...], layers: list[_Layer]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """`StepScalars.histograms` of the step, from its arrays: per label, the packed activation histogram, activation
    exponents and gradient exponents (None where the layer has none)."""
    held = block.histograms()
    hists: dict[str, Any] = {}
    aexps: dict[str, Any] = {}
    gexps: dict[str, Any] = {}
    for label, lay in zip(labels, layers, strict=True):
        if lay.act >= 0:
            hists_of, row = held[lay.act]
            hists[label], aexps[label] = hists_of.packed(row)
        else:
            hists[label] = aexps[label] = None
        if lay.grad >= 0:
            hists_of, row = held[lay.grad]
            gexps[label] = hists_of.packed_exponents(row)
        else:
            gexps[label] = None
    return hists, aexps, gexps


def as_tensor(vec: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(vec) if isinstance(vec, np.ndarray) else vec


def read_back(pending: Mapping[Key, tuple[torch.Tensor | np.ndarray, Any]]) -> dict[Key, tuple[np.ndarray, Any]]:
    """One device-to-host copy per device: concatenate every vector of the step, copy, split on the host."""
    by_device: dict[torch.device, list[tuple[Key, torch.Tensor, Any]]] = {}
    # numpy vectors (the host batch's rows, the host path's norms) are kept as they are, pairs and all (no new
    # tuple for the collector): the whole mapping is copied at once and the tensors' entries replaced.
    out: dict[Key, tuple[np.ndarray, Any]] = dict(pending)  # type: ignore[arg-type]
    for key, (vec, meta) in [(key, pair) for key, pair in pending.items() if not isinstance(pair[0], np.ndarray)]:
        by_device.setdefault(vec.device, []).append((key, vec, meta))  # type: ignore[arg-type]
    for device, items in by_device.items():
        if device.type == "cpu":  # already on the host: no copy to make, so no concatenation either
            for key, vec, meta in items:
                out[key] = (vec.numpy(), meta)
            continue
        flat = torch.cat([v.reshape(-1) for _, v, _ in items]).cpu().numpy()
        pos = 0
        for key, vec, meta in items:
            n = vec.numel()
            out[key] = (flat[pos : pos + n], meta)
            pos += n
    return out
