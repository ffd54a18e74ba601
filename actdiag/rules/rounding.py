"""What low precision rounds away: float16 gradients flushed to zero, and updates of float16/bfloat16 weights too
small to change them (lost_updates).

Both are about the spacing of the format, not its range: float16's smallest subnormal is 2**-24, so a gradient below
2**-25 becomes exactly zero; bfloat16 keeps 8 significant bits (float16 11), so adding an update smaller than half the
spacing between a weight and its neighbour (2**-9 of the weight in bfloat16) leaves the weight as it was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from actdiag.records import Finding, LayerStats, ParamStats
from actdiag.rules._common import fmt
from actdiag.rules.thresholds import Thresholds

HALF = "float16"
# float16's smallest normal value: a gradient below it has lost precision on its way to flushing to zero.
FP16_NORMAL_MIN = 2.0**-14
# Significant bits (with the implicit one) of the low-precision formats whose updates can round away.
SIGNIFICANT_BITS = {"bfloat16": 8, "float16": 11}


def _all_zero(layer: LayerStats) -> bool:
    g = layer.gradient
    return g is not None and g.numel > 0 and g.nonfinite_count == 0 and g.zero_count == g.count


def flushed_gradient_findings(layers: Sequence[LayerStats]) -> list[Finding]:
    """float16 gradients flushed entirely to zero (fp16_underflow, a warning): a float16 layer whose output
    gradient is zero in every element while the nearest later layer with a non-zero gradient has it below float16's
    normal range (it was already fading), or while no later layer has a non-zero gradient at all (the loss's own
    gradient flushed). A zero gradient behind a gradient of ordinary size is structural (a dead ReLU, a zero-initialised
    head) and left to the other rules."""
    flushed: list[tuple[int, float]] = []  # (index, abs max of the nearest later non-zero gradient; 0: none)
    for i, layer in enumerate(layers):
        if layer.dtype != HALF or not _all_zero(layer):
            continue
        later = [lay.gradient for lay in layers[i + 1 :] if lay.gradient is not None and lay.gradient.abs_max > 0]
        nearest = later[0].abs_max if later else 0.0
        if nearest < FP16_NORMAL_MIN:
            flushed.append((i, nearest))
    if not flushed:
        return []
    # Backward runs from the loss: the latest flushed layer in execution order is where the gradient first vanished.
    i, nearest = flushed[-1]
    layer = layers[i]
    if nearest > 0:
        why = (
            f"while the gradient after it is at most {fmt(nearest)}, below float16's normal range: it flushed to "
            "zero (smallest subnormal 2**-24) on its way back"
        )
    else:
        why = (
            "and no later layer's gradient is non-zero: the loss's own gradient fell below float16's smallest "
            "subnormal 2**-24 and flushed to zero"
        )
    others = f" ({len(flushed) - 1} more layer(s) too)" if len(flushed) > 1 else ""
    message = (
        f"The float16 gradient of layer {layer.label} ({layer.type}) is exactly zero in every element{others}, "
        f"{why}, so nothing before it learns."
    )
    return [
        Finding(
            code="fp16_underflow",
            severity="warning",
            layer=layer.name,
            message=message,
            evidence={
                "fraction": 1.0,
                "flushed": 1.0,
                "flushed_layers": float(len(flushed)),
                "next_abs_max": nearest,
                "gradient": 1.0,
                "float16": 1.0,
            },
            related=tuple(dict.fromkeys(layers[j].name for j, _ in flushed[:-1] if layers[j].name != layer.name)),
        )
    ]


def fold_flushed(found: Sequence[Finding]) -> list[Finding]:
    """One cause, one finding: when float16 gradients flushed entirely to zero, the notes on values near float16's
    lower end (rules/precision.py) describe the same cause, and their layers become related ones; a vanishing
    gradient is its consequence (no architecture or initialisation fix brings back a gradient rounded to zero), so
    it is named among the related, not reported with its own fixes."""
    flush = next((f for f in found if f.code == "fp16_underflow" and f.evidence.get("flushed")), None)
    if flush is None:
        return list(found)
    folded = [f for f in found if f is not flush and f.code in ("fp16_underflow", "vanishing_gradient")]
    names = [n for f in folded if f.code == "fp16_underflow" for n in (f.layer, *f.related)]
    codes = [f.code for f in folded if f.code != "fp16_underflow"]
    related = (*flush.related, *(n for n in names if n is not None and n != flush.layer), *codes)
    merged = dataclasses.replace(flush, related=tuple(dict.fromkeys(related)))
    return [merged if f is flush else f for f in found if f not in folded]


def _owner(pname: str) -> str | None:
    return pname.rsplit(".", 1)[0] if "." in pname else None


def lost_update_findings(params: Sequence[ParamStats], t: Thresholds) -> list[Finding]:
    """Weights kept in float16/bfloat16 (no float32 master copy) whose optimizer step left most elements with a
    non-zero gradient unchanged (lost_updates, a warning): the update was below half an ulp and rounded away. One
    finding for the model, at the worst parameter's module. Silent when no element of any parameter moved at all:
    then the optimizer did not step (e.g. a recorded micro-batch of gradient accumulation), which says nothing about
    precision."""
    measured = [p for p in params if p.lost_updates is not None]
    if not measured:
        return []
    stepped = any(p.update_ratio for p in params) or any(
        p.lost_updates.unchanged < p.lost_updates.nonzero for p in measured if p.lost_updates is not None
    )
    if not stepped:
        return []
    hits = [
        p
        for p in measured
        if p.lost_updates is not None
        and p.lost_updates.nonzero >= t.lost_updates_min_elements
        and p.lost_updates.fraction > t.lost_updates_fraction_above
    ]
    if not hits:
        return []
    worst = max(hits, key=lambda p: (p.lost_updates.fraction if p.lost_updates else 0.0, p.weight.numel))
    lost = worst.lost_updates
    assert lost is not None
    bits = SIGNIFICANT_BITS.get(lost.dtype)
    keeps = f"{lost.dtype} keeps {bits} significant bits" if bits else f"{lost.dtype} is coarse"
    others = f"; {len(hits) - 1} more parameter(s) too" if len(hits) > 1 else ""
    sampled = " (over a fixed sample)" if lost.estimated else ""
    message = (
        f"The optimizer step left {lost.fraction:.0%} of the elements of {lost.dtype} parameter {worst.name} unchanged "
        f"although their gradient was non-zero{sampled}{others}: {keeps}, so an update smaller than half the spacing "
        f"between neighbouring values rounds away and these weights do not learn."
    )
    total_unchanged = sum(p.lost_updates.unchanged for p in hits if p.lost_updates is not None)
    total_nonzero = sum(p.lost_updates.nonzero for p in hits if p.lost_updates is not None)
    owners = [_owner(p.name) for p in hits if p is not worst]
    owner = _owner(worst.name)
    return [
        Finding(
            code="lost_updates",
            severity="warning",
            layer=owner,
            message=message,
            evidence={
                "fraction": lost.fraction,
                "unchanged": float(lost.unchanged),
                "nonzero_grad": float(lost.nonzero),
                "parameters": float(len(hits)),
                "fraction_all": total_unchanged / total_nonzero if total_nonzero else 0.0,
                "bfloat16": 1.0 if lost.dtype == "bfloat16" else 0.0,
                "float16": 1.0 if lost.dtype == HALF else 0.0,
            },
            related=tuple(dict.fromkeys(n for n in owners if n is not None and n != owner)),
        )
    ]
