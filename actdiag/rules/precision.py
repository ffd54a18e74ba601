"""Numerical rules: NaN/Inf, and values outside float16's range (overflow, flush to zero)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from actdiag.records import ExponentHistogram, Finding, History, LayerStats, ParamStats, TensorStats
from actdiag.rules._common import REINIT_TYPES, fmt, others_than
from actdiag.rules.thresholds import Thresholds

HALF = "float16"
# bfloat16 has float32's exponent range: nothing about float16's range applies to it.
WIDE = frozenset({"float32", "float64"})
# Layers whose output float16 autocast computes in float16 (matrix products and convolutions: torch's autocast
# "lower precision" op list). Elementwise layers (activations, normalisation, scaling, dropout) run in the widest
# input dtype, so a float32 model's tiny outputs of those would stay float32 under autocast.
AUTOCAST_HALF_TYPES = REINIT_TYPES | {"MultiheadAttention", "RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"}


def _nonfinite(stats: TensorStats | None) -> int:
    return stats.nonfinite_count if stats is not None else 0


def nonfinite_finding(layer: LayerStats, message: str, evidence: Mapping[str, Any], named: Iterable[str]) -> Finding:
    """The NaN/Inf finding at `layer`, where it first appears, with `named` the other layers it reached; for the
    one-step check here and the run's check (rules/run.py) alike."""
    return Finding(
        code="nonfinite",
        severity="error",
        layer=layer.name,
        message=message,
        evidence=evidence,
        related=others_than(layer.name, named),
    )


def first_nonfinite_index(layers: Sequence[LayerStats]) -> int | None:
    """Index of the first layer, in execution order, whose output holds NaN or Inf."""
    for i, layer in enumerate(layers):
        if _nonfinite(layer.activation):
            return i
    return None


def nonfinite_findings(layers: Sequence[LayerStats], params: Sequence[ParamStats]) -> list[Finding]:
    """One finding: where NaN/Inf first appears. Forward outputs come first (everything after them inherits the
    NaN), then gradients (the backward pass runs from the last layer, so the first one there is the latest layer in
    execution order that has a non-finite gradient), then weights (a previous update already diverged)."""
    i = first_nonfinite_index(layers)
    if i is not None:
        layer = layers[i]
        a = layer.activation
        assert a is not None
        weight_bad = _nonfinite(layer.weight) > 0
        where = "its weights already hold NaN/Inf" if weight_bad else "its own weights are finite"
        message = (
            f"NaN/Inf first appears in the output of layer {layer.label} ({layer.type}): {a.nonfinite_count} of "
            f"{a.numel} values are not finite, and {where}."
        )
        evidence = {
            "nonfinite_count": float(a.nonfinite_count),
            "nonfinite_fraction": a.nonfinite_count / a.numel if a.numel else 0.0,
            "position": float(i),
            "weight_nonfinite": float(_nonfinite(layer.weight)),
            "first_layer": 1.0 if i == 0 else 0.0,
            "float16": 1.0 if layer.dtype == HALF else 0.0,
        }
        later = [lay.name for lay in layers[i + 1 :] if _nonfinite(lay.activation)]
        return [nonfinite_finding(layer, message, evidence, later)]
    grads = [(j, lay) for j, lay in enumerate(layers) if _nonfinite(lay.gradient)]
    if grads:
        j, layer = grads[-1]
        g = layer.gradient
        assert g is not None
        message = (
            f"The forward pass is finite but the gradient at layer {layer.label} ({layer.type}) holds "
            f"{g.nonfinite_count} NaN/Inf values: the loss or this layer's backward overflows."
        )
        evidence = {
            "nonfinite_count": float(g.nonfinite_count),
            "nonfinite_fraction": g.nonfinite_count / g.numel if g.numel else 0.0,
            "position": float(j),
            "gradient": 1.0,
            "float16": 1.0 if layer.dtype == HALF else 0.0,
        }
        return [nonfinite_finding(layer, message, evidence, [lay.name for _, lay in grads[:-1]])]
    bad = [p for p in params if p.weight.nonfinite_count or _nonfinite(p.grad)]
    if bad:
        p = bad[0]
        owner = p.name.rsplit(".", 1)[0] if "." in p.name else None
        dtypes = {lay.dtype for lay in layers if lay.weight_name == p.name}
        in_weight = p.weight.nonfinite_count > 0
        if in_weight:
            message = f"Parameter {p.name} holds NaN/Inf values: an earlier update diverged."
        else:
            message = (
                f"The gradient of parameter {p.name} holds NaN/Inf values although the forward pass is finite: "
                "its accumulation overflows."
            )
        evidence = {
            "nonfinite_count": float(p.weight.nonfinite_count + _nonfinite(p.grad)),
            "parameters": float(len(bad)),
            "weight_nonfinite": float(p.weight.nonfinite_count),
            "gradient": 0.0 if in_weight else 1.0,
            "float16": 1.0 if HALF in dtypes else 0.0,
        }
        return [Finding(code="nonfinite", severity="error", layer=owner, message=message, evidence=evidence)]
    return []


def _recent(history: History | None, table: str, label: str, n: int) -> list[ExponentHistogram]:
    if history is None:
        return []
    series = getattr(history, table).get(label, ())
    return [h for h in series[-n:] if h is not None]


def _beyond_scaling(h: ExponentHistogram, span: int) -> float:
    """Share of a histogram's values more than 2**span below its largest binade: no single loss scale brings them
    into float16's range while keeping the largest value finite. Counted by whole binades, erring towards silence
    (values in the binade at the limit are not counted)."""
    top = h.nonzero_range()
    return 0.0 if top is None else h.fraction_below(top[1] - span)


def fp16_findings(layers: Sequence[LayerStats], history: History | None, t: Thresholds) -> list[Finding]:
    """Values that overflow or flush to zero in float16. Tensors computed in float16 (autocast, .half()) are a
    warning. For float32 tensors the finding is an info, and only where it changes a decision about float16: values
    that would overflow it, activations that would flush to zero, and gradients that would flush to zero even with
    loss scaling (the standard float16 recipe rescues every gradient that spans no more than float16 does). The
    latest recorded step and a few before it (watch) are read, so a spike between two reads is not missed."""
    over: list[tuple[LayerStats, str, float, float]] = []  # layer, which tensor, share at risk, abs max
    under: list[tuple[LayerStats, str, float, float]] = []
    for layer in layers:
        if layer.dtype != HALF and layer.dtype not in WIDE:
            continue
        half = layer.dtype == HALF
        # In float16 the tiny values are already zeros; what is still at risk is the subnormal range below 2**-14.
        under_exp = -13 if half else t.fp16_underflow_exponent
        # A float16 tensor is warned one doubling early; a float32 one only where float16 would really be exceeded.
        over_exp = t.fp16_overflow_exponent if half else t.fp16_overflow_exponent + 1
        for which, stats, table in (
            ("activation", layer.activation, "activation_exponents"),
            ("gradient", layer.gradient, "gradient_exponents"),
        ):
            if stats is None or stats.count == 0:
                continue
            hists = [stats.exponents, *_recent(history, table, layer.label, 3)]
            o = max(h.fraction_at_least(over_exp) for h in hists)
            if o > t.fp16_overflow_fraction_above:
                over.append((layer, which, o, stats.abs_max))
            if not half and which == "gradient":
                u = max(_beyond_scaling(h, t.fp16_scalable_span) for h in hists)
            elif not half and layer.type not in AUTOCAST_HALF_TYPES:
                u = 0.0  # computed in float32 under float16 autocast anyway: nothing would flush
            else:
                u = max(h.fraction_below(under_exp) for h in hists)
            if u > (t.fp16_underflow_fraction_above if half else t.fp16_underflow_info_fraction_above):
                under.append((layer, which, u, stats.abs_max))
    found: list[Finding] = []
    for code, hits in (("fp16_overflow", over), ("fp16_underflow", under)):
        if not hits:
            continue
        worst = max(hits, key=lambda h: h[2])
        layer, which, share, amax = worst
        half = any(h[0].dtype == HALF for h in hits)
        if code == "fp16_overflow":
            what = f"{share:.1%} of the {which} values of layer {layer.label} (max |x| {fmt(amax)})"
            tail = "overflow float16's maximum 65504 within one doubling" if half else "would overflow in float16"
        else:
            what = f"{share:.1%} of the non-zero {which} values of layer {layer.label}"
            if half:
                tail = "are below float16's normal range"
            elif which == "gradient":
                tail = (
                    f"lie more than 2^{t.fp16_scalable_span} below its largest one (max |x| {fmt(amax)}): float16 "
                    "would flush them to zero even with loss scaling"
                )
            else:
                tail = "would flush to zero in float16"
        others = f" ({len(hits) - 1} more tensor(s) too)" if len(hits) > 1 else ""
        message = f"{what} {tail}{others}."
        found.append(
            Finding(
                code=code,
                severity="warning" if half else "info",
                layer=layer.name,
                message=message,
                evidence={
                    "fraction": share,
                    "abs_max": amax,
                    "gradient": 1.0 if which == "gradient" else 0.0,
                    "float16": 1.0 if half else 0.0,
                    "tensors": float(len(hits)),
                },
                related=others_than(layer.name, [h[0].name for h in hits]),
            )
        )
    return found
