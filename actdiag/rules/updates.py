"""Update rules: optimizer steps too large or vanishing relative to the weights they change.

Each step is judged against what the optimizer was asked to do. The learning rate in force (read from the optimizer
when it stepped, see `actdiag.hooks.optimizer`) is factored out, so a schedule that decays the rate towards zero is
a schedule, not a stall. A parameter that starts at or near zero (a residual branch's last BatchNorm gain, a layer
scale of 1e-6, a zero bias) has no norm to compare its step with: after k steps of any size its update ratio is about
1/k, so it is judged by the absolute size of its step instead. A stall that grows out of the optimizer's own
arithmetic (AdaGrad divides by the root of the running sum of every squared gradient) is only looked for where that
arithmetic exists, and the advice names what fits the optimizer in use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from actdiag.metrics import GRAD_NORM, LR, UPDATE_RATIO, WEIGHT_NORM
from actdiag.records import Finding, History, LayerStats, ParamStats
from actdiag.rules._common import finite, fmt
from actdiag.rules.thresholds import Thresholds

SPARSE_UPDATE_TYPES = frozenset({"Embedding", "EmbeddingBag"})

# Optimizers whose step shrinks by construction, whatever the gradient does: the denominator is a running sum that
# never forgets (Duchi et al. 2011). Moving averages (RMSProp, Adam, Adadelta) and plain or momentum SGD keep their
# step where the learning rate puts it, so for them a shrinking step is the gradient shrinking (convergence) or the
# schedule, never the optimizer.
ACCUMULATING = frozenset({"Adagrad"})


@dataclass(frozen=True, slots=True)
class _Trend:
    """How far one parameter's step has fallen since the first recorded step, per unit of learning rate."""

    update_decay: float  # ||dW|| / lr, latest over first
    step_decay: float  # ||dW|| / (lr ||grad W||), the optimizer's effective step, latest over first
    points: int


def _series(history: History | None, pname: str) -> Mapping[str, tuple[float, ...]]:
    if history is None:
        return {}
    return history.params.get(pname, {})


def _trend(history: History | None, pname: str, t: Thresholds) -> _Trend | None:
    """The fall of a parameter's step per unit of learning rate since the first recorded step, or None without
    enough history. The effective step ||dW|| / (lr ||grad W||) is 1 for plain SGD and falls like 1/sqrt(steps) for
    AdaGrad; a falling update with a steady effective step is convergence (the gradient shrinks), and a falling
    effective step with a steady update is a gradient that grew, so a stall needs both to fall."""
    series = _series(history, pname)
    ratio, wnorm, gnorm = series.get(UPDATE_RATIO, ()), series.get(WEIGHT_NORM, ()), series.get(GRAD_NORM, ())
    lrs = series.get(LR, ())
    points: list[tuple[float, float]] = []
    for i, (r, w, g) in enumerate(zip(ratio, wnorm, gnorm)):
        lr = lrs[i] if i < len(lrs) and finite(lrs[i]) else 1.0
        if finite(r) and finite(w) and finite(g) and g > 0 and r > 0 and w > 0 and lr > 0:
            points.append((r * w / lr, r * w / (lr * g)))
    if len(points) < t.min_history:
        return None
    (u0, e0) = points[0]
    # The fall must hold at the last two recorded steps: one small step between two normal ones is noise.
    return _Trend(max(u / u0 for u, _ in points[-2:]), max(e / e0 for _, e in points[-2:]), len(points))


def _first_rms(history: History | None, pname: str, layer: LayerStats) -> float:
    """The weight's per-element RMS at the first recorded step (its initialisation, in a run watched from the
    start); the current one without a history."""
    w = layer.weight
    assert w is not None
    norms = [v for v in _series(history, pname).get(WEIGHT_NORM, ()) if finite(v)]
    if norms and w.count:
        return norms[0] / math.sqrt(w.count)
    return w.rms


def _peak_lr(history: History | None, pname: str, lr: float | None) -> float | None:
    """The largest learning rate this parameter has seen in the run (the schedule's peak), or None if unknown."""
    seen = [v for v in _series(history, pname).get(LR, ()) if finite(v)]
    if lr is not None:
        seen.append(lr)
    return max(seen) if seen else None


def update_findings(
    layers: Sequence[LayerStats], history: History | None, t: Thresholds, params: Sequence[ParamStats] = ()
) -> list[Finding]:
    by_name = {p.name: p for p in params}
    large: list[tuple[LayerStats, float, dict[str, float]]] = []
    stalled: list[tuple[LayerStats, float, dict[str, float]]] = []
    kinds: set[str] = set()
    seen: set[str] = set()
    for layer in layers:
        r = layer.update_ratio
        pname = layer.weight_name
        if r is None or not finite(r) or pname is None or pname in seen or layer.weight is None:
            continue
        seen.add(pname)  # a shared module shows up once per call: judge its weight once
        p = by_name.get(pname)
        lr = p.lr if p is not None else None
        kind = p.optimizer if p is not None else None
        start = _first_rms(history, pname, layer)
        if start < t.near_zero_rms_below:
            # No scale of its own to compare with: judged by how far one step moves each element.
            step_rms = r * layer.weight.rms
            if step_rms > t.update_abs_above:
                large.append((layer, r, {"update_rms": step_rms, "initial_rms": start}))
            continue
        if r > t.update_ratio_above:
            large.append((layer, r, {}))
            continue
        # A weight whose gradient is zero does not move whatever the optimizer: that is a dead or detached layer.
        moving_grad = layer.weight_grad is not None and layer.weight_grad.norm > 0
        # An embedding only updates the rows of the tokens in the batch: a small ratio over the whole table is by
        # design, not a stall.
        if not moving_grad or layer.type in SPARSE_UPDATE_TYPES:
            continue
        if lr is not None and lr <= 0:
            continue  # the schedule has stopped training on purpose
        peak = _peak_lr(history, pname, lr)
        # The ratio this step would have had at the schedule's peak learning rate.
        at_peak = r * peak / lr if peak is not None and lr is not None else r
        evidence: dict[str, float] = {}
        if lr is not None:
            evidence["lr"] = lr
        if peak is not None and lr is not None and peak > lr:
            evidence["ratio_at_peak_lr"] = at_peak
        if at_peak < t.update_ratio_below:
            stalled.append((layer, r, evidence))
            if kind:
                kinds.add(kind)
            continue
        if kind is not None and kind not in ACCUMULATING:
            continue
        trend = _trend(history, pname, t)
        # Under an optimizer known to shrink its own step, the fall is the stall under way: the running sum only
        # grows, so the step keeps falling. Without knowing the optimizer, the fall must be steeper and have
        # brought the updates under the healthy ratio too.
        bar = t.stall_decay_below if kind is None else t.accumulating_decay_below
        if trend is None or trend.step_decay >= bar or trend.update_decay >= bar:
            continue
        if kind is None and at_peak >= t.stall_ratio_below:
            continue
        evidence["effective_step_decay"] = trend.step_decay
        evidence["update_decay"] = trend.update_decay
        stalled.append((layer, r, evidence))
        if kind:
            kinds.add(kind)
    found: list[Finding] = []
    if large:
        # Ratios first (a weight with a scale of its own), then the absolute steps of near-zero parameters.
        worst, r, extra = max(large, key=lambda h: ("update_rms" not in h[2], h[2].get("update_rms", h[1])))
        others = f" ({len(large) - 1} more layer(s) too)" if len(large) > 1 else ""
        if "update_rms" in extra:
            what = (
                f"One optimizer step moves each weight of layer {worst.label}, which started near zero "
                f"(RMS {fmt(extra['initial_rms'])}), by {fmt(extra['update_rms'])} on average{others}"
            )
        else:
            what = (
                f"One optimizer step changes the weights of layer {worst.label} by {r:.1%} of their norm{others} "
                "(around 0.1% is typical)"
            )
        found.append(
            Finding(
                code="large_updates",
                severity="warning",
                layer=worst.name,
                message=f"{what}: the learning rate is too high for this layer.",
                evidence={"update_ratio": r, "layers": float(len(large)), **extra},
                related=tuple(dict.fromkeys(h[0].name for h in large if h[0].name != worst.name)),
            )
        )
    if stalled:
        worst, r, extra = min(stalled, key=lambda h: h[2].get("ratio_at_peak_lr", h[1]))
        others = f" ({len(stalled) - 1} more layer(s) too)" if len(stalled) > 1 else ""
        why = ""
        if "effective_step_decay" in extra:
            opt = f"{'/'.join(sorted(kinds))}'s" if kinds else "the optimizer's"
            why = (
                f"; {opt} effective step has fallen to {fmt(extra['effective_step_decay'])} of its first value "
                "and keeps falling"
            )
        elif "ratio_at_peak_lr" in extra:
            why = f" (even at the schedule's peak learning rate it would be {fmt(extra['ratio_at_peak_lr'])})"
        found.append(
            Finding(
                code="stalled_updates",
                severity="warning",
                layer=worst.name,
                message=(
                    f"One optimizer step changes the weights of layer {worst.label} by only {fmt(r)} of their norm"
                    f"{why}{others}: training has stalled although gradients still flow."
                ),
                evidence={"update_ratio": r, "layers": float(len(stalled)), **extra},
                related=tuple(dict.fromkeys(h[0].name for h in stalled if h[0].name != worst.name)),
            )
        )
    return found
