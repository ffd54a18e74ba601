"""Rules: small pure functions from records to findings, one module per family.

    gradients    vanishing_gradient, exploding_gradient
    activations  activation_collapse, activation_explosion, saturation, dead_relu
    precision    nonfinite, fp16_overflow, fp16_underflow
    rounding     fp16_underflow (gradients flushed to zero), lost_updates
    updates      large_updates, stalled_updates

`diagnose` runs them all on one recorded step (and the history, for the training-time rules), groups what one root
cause produced and ranks the result. It is a pure function of records: what to try for each finding is attached
afterwards (`actdiag.fixes.attach_fixes`), where the report is assembled. Every threshold lives in
`actdiag.rules.thresholds.Thresholds`.
"""

from __future__ import annotations

from collections.abc import Sequence

from actdiag.records import Finding, History, LayerStats, ParamStats
from actdiag.rules.activations import dead_relu_findings, saturation_findings, spread_findings
from actdiag.rules.gradients import gradient_findings, link_causes
from actdiag.rules.precision import first_nonfinite_index, fp16_findings, nonfinite_findings
from actdiag.rules.rounding import flushed_gradient_findings, fold_flushed, lost_update_findings
from actdiag.rules.run import dead_unit_findings, has_unit_activity, link_consequences
from actdiag.rules.thresholds import DEFAULT_THRESHOLDS, Thresholds
from actdiag.rules.updates import update_findings

__all__ = ["DEFAULT_THRESHOLDS", "Thresholds", "diagnose", "rank"]

# Within one severity, root causes first: a NaN explains everything after it, gradient and spread problems explain
# slow learning, saturation and dead units are local, precision and update findings are about the training setup.
CODE_PRIORITY = {
    "nonfinite": 0,
    "activation_explosion": 1,
    "exploding_gradient": 2,
    "activation_collapse": 3,
    "vanishing_gradient": 4,
    "saturation": 5,
    "dead_relu": 6,
    "large_updates": 7,
    "stalled_updates": 8,
    "fp16_overflow": 9,
    "fp16_underflow": 10,
    "lost_updates": 11,
}


def diagnose(
    layers: Sequence[LayerStats],
    params: Sequence[ParamStats] = (),
    history: History | None = None,
    thresholds: Thresholds | None = None,
    first_nonfinite: Finding | None = None,
) -> tuple[Finding, ...]:
    """Findings for one recorded step (layers in forward order) and its history, ranked most severe first.
    `first_nonfinite`: the run's first NaN/Inf (`rules.run.nonfinite_event`), named instead of where this step
    first shows NaN/Inf (which, once NaN has spread, is the first layer whatever produced it)."""
    t = thresholds if thresholds is not None else DEFAULT_THRESHOLDS
    layers = tuple(layers)
    found = list(nonfinite_findings(layers, params))
    if found and first_nonfinite is not None:
        found = [first_nonfinite]
    # Statistics are taken over finite values only: downstream of the first NaN they describe leftovers, so the
    # other rules only look at the layers before it (the NaN is the root cause of whatever comes after).
    cut = first_nonfinite_index(layers)
    clean = layers if cut is None else layers[:cut]
    spread = spread_findings(clean, t)
    found += spread
    if not found or found == spread:  # a NaN anywhere (forward or backward) leaves the gradient statistics meaningless
        found += link_causes(gradient_findings(clean, t), spread)
    found += saturation_findings(clean, t)
    # Silence streaks over the run when the recorder kept them; a step without them (merged across ranks) is
    # judged by its own dead share and the history.
    found += dead_unit_findings(clean, t) if has_unit_activity(clean) else dead_relu_findings(clean, history, t)
    found += fp16_findings(clean, history, t)
    found = fold_flushed([*flushed_gradient_findings(clean), *found])
    found += update_findings(layers, history, t, params)
    found += lost_update_findings(params, t)
    return rank(_group(link_consequences(found, clean)), layers)


_SIGNAL = frozenset(
    {"activation_collapse", "activation_explosion", "vanishing_gradient", "exploding_gradient", "saturation"}
)


def _group(found: list[Finding]) -> list[Finding]:
    """One root cause, one finding (each rule already folds all the layers it hits into one finding):

    * a layer dead for every unit passes no gradient back, so a vanishing gradient before it is its consequence;
    * a float32 model's "would not fit float16" notes (info) are dropped while a signal-propagation problem is
      reported: saturated or collapsed layers make tiny gradients, and fixing that is what matters first.
    """
    dead_all = any(f.code == "dead_relu" and f.severity == "error" for f in found)
    signal = any(f.code in _SIGNAL and f.rank >= 1 for f in found)
    out: list[Finding] = []
    for f in found:
        if dead_all and f.code == "vanishing_gradient":
            continue
        if signal and f.code in ("fp16_overflow", "fp16_underflow") and f.severity == "info":
            continue
        out.append(f)
    return out


def rank(findings: Sequence[Finding], layers: Sequence[LayerStats] = ()) -> tuple[Finding, ...]:
    """Most severe first; then root causes before consequences (CODE_PRIORITY); then earlier layers first."""
    position: dict[str, int] = {}
    for i, layer in enumerate(layers):
        position.setdefault(layer.name, i)

    def key(f: Finding) -> tuple[int, int, int]:
        pos = position.get(f.layer, len(position)) if f.layer is not None else -1
        return (-f.rank, CODE_PRIORITY.get(f.code, len(CODE_PRIORITY)), pos)

    return tuple(sorted(findings, key=key))
