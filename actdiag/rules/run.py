"""Rules over a whole run: units that died over a recent window, and where a NaN/Inf first appeared.

One recorded step cannot tell these apart from their consequences. A unit alive at step 0 that dies after a too
large step looks like any other silent unit in the latest step; a NaN first produced in the logits at step 42 has
reached every weight by the end of the run, where the latest step would blame layer 0. So:

* `dead_unit_findings` reads `LayerStats.activity`, the per-unit silence streaks the recorder keeps over the whole
  watch (`actdiag.hooks.tracking`): a unit is dead when it produced no positive output for any sample in its last
  `Thresholds.dead_window` recorded calls, and the finding says whether it never fired (dead since
  initialisation) or stopped firing in training, and since which recorded step;
* `nonfinite_event` is run on each recorded step until it first finds NaN/Inf; the monitor keeps that finding for
  the rest of the run (`diagnose(..., first_nonfinite=...)`).

Evidence: `pass` is "forward" or "backward" (CONTRACT.md, "Findings over a run": the one text value); what the
evidence points to is a flag `cause_updates`, `cause_unseen_update`, `cause_inputs`, `cause_overflow` or
`cause_operation` (1.0), and the fixes follow it (`actdiag.fixes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from actdiag.metrics import any_nonfinite
from actdiag.records import Finding, LayerStats, ParamStats, StepRecord, TensorStats, UnitActivity
from actdiag.rules._common import DEAD_CAPABLE, fmt
from actdiag.rules.activations import dead_relu_finding, samples_per_unit
from actdiag.rules.precision import HALF, nonfinite_finding
from actdiag.rules.thresholds import Thresholds

# How many dead units a message names (the record keeps at most this many examples anyway).
NAMED_UNITS = 8


# ------------------------------------------------------------------------------------------------ dead units
def _since_step(act: UnitActivity, window: int, count_above: float) -> int:
    """The recorded step from which more than `count_above` of the units have been silent: walking from the
    longest streak to the shortest that counts as dead, the since-step at which the silent units pass the share."""
    total = 0
    for s in range(len(act.silent) - 1, window - 1, -1):
        total += act.silent[s]
        if total > count_above:
            return act.since[s]
    return act.since[min(window, len(act.since) - 1)]


def has_unit_activity(layers: Sequence[LayerStats]) -> bool:
    """Whether the step carries silence streaks (a watch or inspect run without distributed merging)."""
    return any(layer.activity is not None for layer in layers if layer.type in DEAD_CAPABLE)


def dead_unit_findings(layers: Sequence[LayerStats], t: Thresholds) -> list[Finding]:
    """ReLU units with no positive output for any sample over their last `dead_window` recorded calls (fewer at the
    start of a run: every call so far). One finding for the worst layer; the others are `related`."""
    hits: list[tuple[LayerStats, UnitActivity, int, int]] = []  # layer, activity, window, dead units
    for layer in layers:
        act = layer.activity
        if layer.type not in DEAD_CAPABLE or act is None or not layer.units or act.calls < 1:
            continue
        window = max(1, min(t.dead_window, act.calls))
        if samples_per_unit(layer) * window < t.dead_min_samples:
            continue
        dead = act.silent_for_at_least(window)
        if dead / layer.units > t.dead_fraction_above:
            hits.append((layer, act, window, dead))
    if not hits:
        return []
    worst, act, window, dead = max(hits, key=lambda h: h[3] / (h[0].units or 1))
    units = worst.units or 1
    share = dead / units
    never = min(act.never, dead)
    since_init = never * 2 > dead
    first_step = _since_step(act, window, t.dead_fraction_above * units)
    named = [i for i, n in act.examples if n >= window][:NAMED_UNITS]
    which = ", ".join(str(i) for i in named) + (", ..." if dead > len(named) else "")
    others = f" ({len(hits) - 1} more layer(s) too)" if len(hits) > 1 else ""
    span = f" for {window} recorded steps" if window > 1 else ""
    if since_init:
        origin = (
            f"{never} of them have not fired in any recorded step since the first ({first_step}): they are dead from "
            "initialisation (weights or biases that keep their pre-activations negative)"
        )
    else:
        origin = (
            f"they died in training: {dead - never} of them fired before and have been silent since recorded step "
            f"{first_step} (a too large update pushed their pre-activations below zero)"
        )
    message = (
        f"{share:.0%} of the {worst.units} units of layer {worst.label} (units {which}) output zero for every "
        f"sample{span}{others}; {origin}. They pass no gradient and no longer learn."
    )
    evidence: dict[str, Any] = {
        "dead_fraction": share,
        "first_step": float(first_step),
        "since_init": 1.0 if since_init else 0.0,
        "units": float(units),
        "dead_units": float(dead),
        "never_active": float(never),
        "died_in_training": float(dead - never),
        "steps": float(window),
        "layers": float(len(hits)),
    }
    return [dead_relu_finding(worst, share, message, evidence, [h[0].name for h in hits], t)]


def link_consequences(found: Sequence[Finding], layers: Sequence[LayerStats]) -> list[Finding]:
    """A layer whose units are dead passes (almost) no gradient back: a vanishing gradient at a layer before it is
    its consequence. It is folded into the dead-unit finding (its code in `related`, its layer in the message) rather
    than standing as a headline of its own with a fix for the wrong cause."""
    dead = next((f for f in found if f.code == "dead_relu" and f.layer is not None), None)
    if dead is None:
        return list(found)
    position = {layer.name: i for i, layer in reversed(list(enumerate(layers)))}
    dead_layers = [dead.layer, *dead.related]
    last_dead = max((position[n] for n in dead_layers if n in position), default=-1)
    out: list[Finding] = []
    folded: list[str] = []
    for f in found:
        if f.code == "vanishing_gradient" and f.layer in position and position[f.layer] <= last_dead:
            folded.append(f.layer)
            continue
        out.append(f)
    if not folded:
        return out
    note = f" The gradient before it vanishes as a consequence (at layer {folded[0]})."
    linked = Finding(
        code=dead.code,
        severity=dead.severity,
        layer=dead.layer,
        message=dead.message + note,
        evidence=dead.evidence,
        fixes=dead.fixes,
        # The consequence's code, not its layer: `related` layers are the ones sharing the cause (fixes target them).
        related=tuple(dict.fromkeys([*dead.related, "vanishing_gradient"])),
    )
    return [linked if f is dead else f for f in out]


# ------------------------------------------------------------------------------------------------ NaN / Inf
def _bad(stats: TensorStats | None) -> int:
    return stats.nonfinite_count if stats is not None else 0


def _max_update_ratio(record: StepRecord | None) -> float:
    if record is None:
        return math.nan
    ratios = [p.update_ratio for p in record.params if p.update_ratio is not None]
    ratios += [lay.update_ratio for lay in record.layers if lay.update_ratio is not None]
    finite = [r for r in ratios if math.isfinite(r)]
    return max(finite) if finite else math.nan


def _backward_culprit(layers: Sequence[LayerStats], params: Sequence[ParamStats]) -> tuple[int, str] | None:
    """(index, how) of the module whose backward first produced NaN/Inf: its output gradient is finite while the
    gradient with respect to its input (or its own weight's) is not. Without such a module, the last layer in
    execution order whose output gradient is not finite: the loss (or what follows the recorded modules) sent it."""
    bad_param = {p.name for p in params if _bad(p.grad)}
    candidates = [
        i
        for i, lay in enumerate(layers)
        if lay.gradient is not None
        and not _bad(lay.gradient)
        and ((lay.input_grad_nonfinite or 0) > 0 or _bad(lay.weight_grad) or lay.weight_name in bad_param)
    ]
    if candidates:
        return candidates[-1], "module"
    grads = [i for i, lay in enumerate(layers) if _bad(lay.gradient)]
    if grads:
        return grads[-1], "loss"
    return None


def _cause(layer: LayerStats, weights_bad: bool, ratio_before: float, t: Thresholds) -> str:
    """What the evidence points to: updates that blew up (the recorded update before was too large), weights made
    NaN/Inf between recorded steps by an update we did not see (a NaN gradient or a blow-up: both stay possible),
    float16 overflow, or an operation of the layer itself."""
    if math.isfinite(ratio_before) and ratio_before > t.update_ratio_above:
        return "updates"
    if weights_bad:
        return "unseen_update"
    if layer.dtype == HALF:
        return "overflow"
    return "operation"


def nonfinite_event(record: StepRecord, previous: StepRecord | None, t: Thresholds) -> Finding | None:
    """The `nonfinite` finding for the first recorded step that holds NaN/Inf (None while everything is finite).

    Forward first (the first layer in execution order whose output is not finite; a non-finite model input is
    reported as such), then the backward (`_backward_culprit`), then parameters alone. `previous` is the recorded
    step before, for the update ratio that preceded the NaN."""
    if not any_nonfinite(record):
        return None
    layers, params = record.layers, record.params
    ratio_before = _max_update_ratio(previous)
    evidence: dict[str, Any] = {"pass": "forward", "first_step": float(record.step)}
    gap = ""
    if previous is not None:
        evidence["previous_recorded_step"] = float(previous.step)
        if record.step - previous.step > 1:
            gap = (
                f" It may have appeared at an unrecorded step after recorded step {previous.step}: step "
                f"{record.step} is the first recorded step that shows it."
            )
    if math.isfinite(ratio_before):
        evidence["update_ratio_before"] = ratio_before
    fwd = next((i for i, lay in enumerate(layers) if _bad(lay.activation)), None)
    first_input_bad = bool(layers) and (layers[0].input_nonfinite or 0) > 0
    if fwd is not None or first_input_bad:
        i = 0 if first_input_bad else fwd
        assert i is not None
        layer = layers[i]
        weights_bad = _bad(layer.weight) > 0
        cause = "inputs" if first_input_bad else _cause(layer, weights_bad, ratio_before, t)
        a = layer.activation
        count = layer.input_nonfinite if first_input_bad else (a.nonfinite_count if a else 0)
        what = {
            "inputs": f"the model's input already holds {count} NaN/Inf values",
            "updates": f"the update before it was {fmt(ratio_before)} of the weights: the updates blew up",
            "unseen_update": (
                "its weights already hold NaN/Inf: an update since the previous recorded step put them there (a "
                "NaN gradient, or updates that blew up)"
            ),
            "overflow": "its float16 output overflowed float16's range (65504)",
            "operation": (
                f"its input{' and weights are' if layer.weight is not None else ' is'} finite: an operation of this "
                "layer produced it"
            ),
        }[cause]
        message = (
            f"NaN/Inf first appears in the forward pass at layer {layer.label} ({layer.type}), recorded step "
            f"{record.step}: {what}.{gap}"
        )
        evidence.update(
            {
                "pass": "forward",
                f"cause_{cause}": 1.0,
                "nonfinite_count": float(count or 0),
                "position": float(i),
                "weight_nonfinite": float(_bad(layer.weight)),
                "float16": 1.0 if layer.dtype == HALF else 0.0,
            }
        )
        later = [lay.name for lay in layers[i + 1 :] if _bad(lay.activation)]
        return nonfinite_finding(layer, message, evidence, later)
    culprit = _backward_culprit(layers, params)
    if culprit is not None:
        j, how = culprit
        layer = layers[j]
        cause = _cause(layer, False, ratio_before, t)
        if how == "module":
            where = (
                f"the backward of layer {layer.label} ({layer.type}) turns a finite gradient of its output into NaN/Inf"
            )
        else:
            where = f"the gradient reaching the output of layer {layer.label} ({layer.type}) from the loss is NaN/Inf"
        reason = {
            "updates": f" after an update of {fmt(ratio_before)} of the weights (the updates blew up)",
            "unseen_update": "",
            "overflow": " (float16 overflow)",
            "operation": "",
        }[cause]
        message = f"NaN/Inf first appears in the backward pass at recorded step {record.step}: {where}{reason}.{gap}"
        evidence.update(
            {
                "pass": "backward",
                f"cause_{cause}": 1.0,
                "position": float(j),
                "gradient": 1.0,
                "input_grad_nonfinite": float(layer.input_grad_nonfinite or 0),
                "float16": 1.0 if layer.dtype == HALF else 0.0,
            }
        )
        upstream = [lay.name for lay in layers[:j] if _bad(lay.gradient)]
        return nonfinite_finding(layer, message, evidence, upstream)
    bad = [p for p in params if _bad(p.weight) or _bad(p.grad)]
    p = bad[0]
    owner = p.name.rsplit(".", 1)[0] if "." in p.name else None
    in_weight = _bad(p.weight) > 0
    evidence.update(
        {
            "pass": "forward" if in_weight else "backward",
            f"cause_{_cause_param(in_weight, ratio_before, t)}": 1.0,
            "parameters": float(len(bad)),
            "weight_nonfinite": float(_bad(p.weight)),
            "gradient": 0.0 if in_weight else 1.0,
        }
    )
    what = "holds NaN/Inf values: an earlier update diverged" if in_weight else "has a NaN/Inf gradient"
    message = f"Parameter {p.name} {what} (recorded step {record.step}).{gap}"
    return Finding(code="nonfinite", severity="error", layer=owner, message=message, evidence=evidence)


def _cause_param(in_weight: bool, ratio_before: float, t: Thresholds) -> str:
    if math.isfinite(ratio_before) and ratio_before > t.update_ratio_above:
        return "updates"
    return "unseen_update" if in_weight else "operation"
