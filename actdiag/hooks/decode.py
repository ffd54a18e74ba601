"""From a recorded step's vectors to a StepRecord: one read-back per device, then decoding by key.

The recorder collects, per step, a vector (and its meta) under a `Key` for every measured tensor and count; this
module copies them to the host in one transfer per device and turns them into the frozen records of
`actdiag.records`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actdiag.hooks.keys import Key, layer_keys, param_keys
from actdiag.hooks.layout import StatsMeta, decode_many
from actdiag.hooks.tracking import UnitStreaks
from actdiag.records import LayerStats, LostUpdates, ParamStats, StepRecord, TensorStats


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
    with their update ratios and lost-update counts, layers in forward order with their unit-health shares."""
    keys = [k for k, (_, meta) in host.items() if isinstance(meta, StatsMeta)]
    decoded = dict(zip(keys, decode_many([host[k][0] for k in keys], [host[k][1] for k in keys]), strict=True))

    def stats(key: Key) -> TensorStats | None:
        return decoded.get(aliases.get(key, key))

    seen = optimizers or {}
    params: list[ParamStats] = []
    by_name: dict[str, ParamStats] = {}
    for pname, p in named_params:
        pkeys = param_keys(pname)
        w = stats(pkeys.weight)
        if w is None:
            continue
        upd = host.get(pkeys.update)
        ratio = None
        if upd is not None:
            delta, norm0 = (float(v) for v in upd[0])  # updates.UpdateRatios: the two norms
            ratio = delta / norm0 if norm0 > 0 and math.isfinite(norm0) else None
        counts = host.get(pkeys.lost)
        lost = None
        if counts is not None:
            unchanged, nonzero = (int(v) for v in counts[0])  # updates.LostUpdateCounts
            dtype = str(p.dtype).replace("torch.", "")
            lost = LostUpdates(unchanged, nonzero, dtype, update_sampled(p.numel()))
        lr, optimizer = seen.get(pname, (None, None))
        ps = ParamStats(
            name=pname,
            shape=tuple(p.shape),
            requires_grad=p.requires_grad,
            weight=w,
            grad=stats(pkeys.grad),
            update_ratio=ratio,
            update_ratio_estimated=ratio is not None and update_sampled(p.numel()),
            lost_updates=lost,
            lr=lr,
            optimizer=optimizer,
        )
        params.append(ps)
        by_name[pname] = ps
    layers = []
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
            dead, rare, never = (float(v) / info.units for v in units[0][:3])
            streak = host.get(lkeys.streak)
            if streak is not None:
                activity = streaks.decode(name, call, streak[0], int(units[0][2]))
        inp = host.get(lkeys.input)
        ingrad = host.get(lkeys.ingrad)
        src = (input_from or {}).get((name, call))
        src_grad = stats(layer_keys(src.name, src.call).grad) if src is not None else None
        in_grad = int(ingrad[0][0]) if ingrad is not None else (src_grad.nonfinite_count if src_grad else None)
        wp = by_name.get(info.weight_name) if info.weight_name else None
        layers.append(
            LayerStats(
                name=name,
                type=info.type,
                step=step,
                call=call,
                shape=info.shape,
                dtype=info.dtype,
                activation=stats(lkeys.act),
                gradient=stats(lkeys.grad),
                weight=wp.weight if wp else None,
                weight_grad=wp.grad if wp else None,
                weight_name=info.weight_name if wp else None,
                bounds=info.bounds,
                saturation=saturation,
                units=info.units,
                dead_fraction=dead,
                rare_fraction=rare,
                never_active_fraction=never,
                update_ratio=wp.update_ratio if wp else None,
                update_ratio_estimated=wp.update_ratio_estimated if wp else False,
                activity=activity,
                input_nonfinite=int(inp[0][0]) if inp is not None else None,
                input_grad_nonfinite=in_grad,
                output=info.output,
            )
        )
    return StepRecord(step=step, layers=tuple(layers), params=tuple(params))


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
