"""Gradient rules: vanishing and exploding gradients across depth.

The reference is the gradient at the last layer that has one. Without a loss function `inspect` backpropagates a
random unit-variance gradient from the outputs, so that reference has std ~1 and the ratio measures only how the
network itself propagates signal backwards.

Two ratios are compared, first layer over last layer:

* the gradient itself (AUTOTRAINER's rule): its L2 norm for vanishing and its per-element RMS for exploding. Each
  direction uses the measure that errs towards silence: early layers of a CNN hold more elements (a larger norm,
  so fewer vanishing alarms), and pooling divides each element's gradient (a smaller RMS, fewer exploding alarms);
* the same ratio of ||g|| * ||y|| (gradient times the layer's own output). For ReLU, linear, pooling and
  normalisation layers this product is what an undisturbed backward pass carries along, so if it stays put the
  gradient only mirrors the forward activations shrinking or growing: that is activation collapse/explosion (one
  root cause, reported once by the activation rules), or merely a normalised layer with a large output scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from actdiag.records import Finding, LayerStats
from actdiag.rules._common import fmt
from actdiag.rules.thresholds import Thresholds


def gradient_chain(layers: Sequence[LayerStats]) -> list[LayerStats]:
    """Layers with a gradient that has finite values and an output with finite values, in execution order."""
    return [
        layer
        for layer in layers
        if layer.gradient is not None
        and layer.gradient.count > 0
        and layer.activation is not None
        and layer.activation.count > 0
    ]


def _first_trainable(chain: Sequence[LayerStats]) -> LayerStats:
    for layer in chain:
        if layer.weight_grad is not None:
            return layer
    return chain[0]


def gradient_findings(layers: Sequence[LayerStats], t: Thresholds) -> list[Finding]:
    chain = gradient_chain(layers)
    if len(chain) < 2:
        return []
    last = chain[-1]
    first = _first_trainable(chain)
    if first is last:
        return []
    g_last, y_last = last.gradient, last.activation
    g_first, y_first = first.gradient, first.activation
    assert g_last is not None and y_last is not None and g_first is not None and y_first is not None
    if g_last.norm == 0 or y_last.norm == 0 or y_first.norm == 0:
        return []
    norm_ratio = g_first.norm / g_last.norm
    rms_ratio = g_first.rms / g_last.rms
    carried = (g_first.norm * y_first.norm) / (g_last.norm * y_last.norm)
    evidence = {
        "ratio": norm_ratio,
        "rms_ratio": rms_ratio,
        "carried_ratio": carried,
        "first_grad_rms": g_first.rms,
        "last_grad_rms": g_last.rms,
    }
    start = chain.index(first)
    span = chain[start:-1]
    found: list[Finding] = []
    # A weight that is exactly zero passes no gradient back (dL/dx = W^T g = 0) until its first update. Zero-
    # initialised heads and gates (ViT's classifier, ControlNet's zero convolutions, adaLN-zero) do this on purpose,
    # so a gradient that vanishes behind one is by design, not a vanishing-gradient problem.
    # (The mean is exact even when the extremes are estimated from a sample: a zero sample of a weight that is not
    # all zeros still shows a non-zero mean, barring an exact cancellation.)
    behind_zero = any(
        lay.weight is not None and lay.weight.count > 0 and lay.weight.abs_max == 0 and lay.weight.mean == 0
        for lay in layers[layers.index(first) + 1 :]
    )
    if behind_zero:
        return []
    negligible = g_first.rms < t.vanishing_abs_below <= g_last.rms * t.vanishing_ratio_below
    if norm_ratio < t.vanishing_ratio_below or negligible:
        related = [
            lay.name
            for lay in span
            if lay is not first
            and lay.gradient is not None
            and lay.gradient.norm < t.vanishing_ratio_below * g_last.norm
        ]
        if g_first.norm == 0:
            message = (
                f"No gradient reaches layer {first.label} (RMS {fmt(g_last.rms)} at layer {last.label}): "
                "it cannot learn."
            )
        else:
            message = (
                f"The gradient reaching layer {first.label} is {fmt(norm_ratio)} times the one at layer "
                f"{last.label} (RMS {fmt(g_first.rms)} vs {fmt(g_last.rms)}): the first layers barely learn."
            )
        found.append(
            Finding(
                code="vanishing_gradient",
                severity="warning",
                layer=first.name,
                message=message,
                evidence=evidence,
                related=tuple(dict.fromkeys(n for n in related if n != first.name)),
            )
        )
    if rms_ratio > t.exploding_ratio_above:
        related = [
            lay.name
            for lay in span
            if lay is not first and lay.gradient is not None and lay.gradient.rms > t.exploding_ratio_above * g_last.rms
        ]
        message = (
            f"The gradient grows {fmt(rms_ratio)}x from layer {last.label} back to layer {first.label} (RMS "
            f"{fmt(g_last.rms)} -> {fmt(g_first.rms)}): updates of the first layers will be far too large."
        )
        found.append(
            Finding(
                code="exploding_gradient",
                severity="warning",
                layer=first.name,
                message=message,
                evidence=evidence,
                related=tuple(dict.fromkeys(n for n in related if n != first.name)),
            )
        )
    return found


# The forward pass a gradient mirrors: a collapse of the activations makes the gradient vanish through the same
# weights, an explosion makes it explode.
_CAUSES = {"vanishing_gradient": "activation_collapse", "exploding_gradient": "activation_explosion"}


def link_causes(gradient: Sequence[Finding], spread: Sequence[Finding]) -> list[Finding]:
    """The gradient findings, each naming the spread finding that causes it (its code, in `related`) when there is
    one: the gradient finding still stands, measured on its own, and the reader sees which problem to fix first."""
    codes = {f.code for f in spread}
    out = []
    for f in gradient:
        cause = _CAUSES.get(f.code)
        if cause in codes:
            f = dataclasses.replace(f, related=(*f.related, cause))
        out.append(f)
    return out
