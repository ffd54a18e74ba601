"""Update rules: optimizer steps too large or vanishing relative to the weights they change."""

from __future__ import annotations

from collections.abc import Sequence

from actdiag.metrics import GRAD_NORM, UPDATE_RATIO, WEIGHT_NORM
from actdiag.records import Finding, History, LayerStats
from actdiag.rules._common import finite, fmt
from actdiag.rules.thresholds import Thresholds

SPARSE_UPDATE_TYPES = frozenset({"Embedding", "EmbeddingBag"})


def _effective_step_decay(history: History | None, pname: str, t: Thresholds) -> tuple[float, float] | None:
    """(latest / first effective step, recorded points) for one parameter, or None without enough history.

    The effective step is ||dW|| / ||grad W|| = update_ratio * ||W|| / ||grad W||: the learning rate the optimizer
    really applied. Plain SGD keeps it constant; AdaGrad divides it by the root of all squared gradients so far.
    A falling update ratio with a steady effective step is convergence (gradients shrink), not a stall.

    The reference is the first recorded step, not the largest value: momentum's effective step spikes whenever the
    gradient momentarily shrinks under a large velocity, and such a spike is not a learning rate that was lost.
    """
    if history is None:
        return None
    series = history.params.get(pname)
    if not series:
        return None
    ratio, wnorm, gnorm = series.get(UPDATE_RATIO, ()), series.get(WEIGHT_NORM, ()), series.get(GRAD_NORM, ())
    eff = [
        r * w / g
        for r, w, g in zip(ratio, wnorm, gnorm)
        if finite(r) and finite(w) and finite(g) and g > 0 and r > 0 and w > 0
    ]
    if len(eff) < t.min_history:
        return None
    return eff[-1] / eff[0], float(len(eff))


def update_findings(layers: Sequence[LayerStats], history: History | None, t: Thresholds) -> list[Finding]:
    large: list[tuple[LayerStats, float]] = []
    stalled: list[tuple[LayerStats, float, float | None]] = []  # layer, ratio, effective-step decay
    seen: set[str] = set()
    for layer in layers:
        r = layer.update_ratio
        if r is None or not finite(r) or layer.weight_name is None or layer.weight_name in seen:
            continue
        seen.add(layer.weight_name)  # a shared module shows up once per call: judge its weight once
        if r > t.update_ratio_above:
            large.append((layer, r))
            continue
        # A weight whose gradient is zero does not move whatever the optimizer: that is a dead or detached layer.
        moving_grad = layer.weight_grad is not None and layer.weight_grad.norm > 0
        # An embedding only updates the rows of the tokens in the batch: a small ratio over the whole table is by
        # design, not a stall.
        if not moving_grad or layer.type in SPARSE_UPDATE_TYPES:
            continue
        if r < t.update_ratio_below:
            stalled.append((layer, r, None))
            continue
        trend = _effective_step_decay(history, layer.weight_name, t)
        if trend is not None and trend[0] < t.stall_decay_below and r < t.stall_ratio_below:
            stalled.append((layer, r, trend[0]))
    found: list[Finding] = []
    if large:
        worst, r = max(large, key=lambda h: h[1])
        others = f" ({len(large) - 1} more layer(s) too)" if len(large) > 1 else ""
        found.append(
            Finding(
                code="large_updates",
                severity="warning",
                layer=worst.name,
                message=(
                    f"One optimizer step changes the weights of layer {worst.label} by {r:.1%} of their norm{others} "
                    "(around 0.1% is typical): the learning rate is too high for this layer."
                ),
                evidence={"update_ratio": r, "layers": float(len(large))},
                related=tuple(dict.fromkeys(h[0].name for h in large if h[0].name != worst.name)),
            )
        )
    if stalled:
        worst, r, decay = min(stalled, key=lambda h: h[1])
        others = f" ({len(stalled) - 1} more layer(s) too)" if len(stalled) > 1 else ""
        why = ""
        if decay is not None:
            why = f"; the optimizer's effective step has fallen to {fmt(decay)} of its first value"
        evidence = {"update_ratio": r, "layers": float(len(stalled))}
        if decay is not None:
            evidence["effective_step_decay"] = decay
        found.append(
            Finding(
                code="stalled_updates",
                severity="warning",
                layer=worst.name,
                message=(
                    f"One optimizer step changes the weights of layer {worst.label} by only {fmt(r)} of their norm"
                    f"{why}{others}: training has stalled although gradients still flow."
                ),
                evidence=evidence,
                related=tuple(dict.fromkeys(h[0].name for h in stalled if h[0].name != worst.name)),
            )
        )
    return found
