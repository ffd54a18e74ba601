"""Two runs of one model, compared: what changed per layer, and which findings appeared or went away.

`compare(before, after)` reads two `Report`s (e.g. loaded with `actdiag.reports.json.load_json`) and returns a
`RunDiff`; `actdiag diff BEFORE.json AFTER.json` prints it (`actdiag.reports.console.format_diff`). Comparing runs
of different models is refused with `DifferentModelsError`, which names what differs.

Layers are matched by their label (name, and `#k` for a module's k-th call in one forward pass). A run of the same
model class may gain or lose layers (a BatchNorm added as a fix): those are listed, and the layers both runs have
are compared. It is a different model when the class name differs, when a layer of the same name has a different
type, or when the runs share no layer.

A finding is matched by (code, layer). It *appeared* when the after-run has it and the before-run does not, or has
it at a lower severity (it got worse); it *went away* when only the before-run has it. The exit status of
`actdiag diff --fail-on` reads `appeared` only: a CI gate fails on what the change made worse, not on what was
already there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from actdiag.errors import ActdiagError
from actdiag.records import Finding, LayerStats, Report


class DifferentModelsError(ActdiagError, ValueError):
    """The two runs are of different models; the message names what differs."""


def _act_std(layer: LayerStats) -> float | None:
    return layer.activation.std if layer.activation is not None else None


def _grad_rms(layer: LayerStats) -> float | None:
    return layer.gradient.rms if layer.gradient is not None else None


def _grad_norm(layer: LayerStats) -> float | None:
    return layer.gradient.norm if layer.gradient is not None else None


def _nonfinite(layer: LayerStats) -> float | None:
    found = [s.nonfinite_count for s in (layer.activation, layer.gradient) if s is not None]
    return float(sum(found)) if found else None


@dataclass(frozen=True, slots=True)
class Metric:
    """One per-layer quantity compared between runs. `share` metrics are fractions in [0, 1], compared by their
    difference; the others are magnitudes, compared by their ratio."""

    name: str
    label: str
    read: Callable[[LayerStats], float | None]
    share: bool = False


# What a depth profile shows (the same quantities as the HTML report's depth charts).
METRICS: tuple[Metric, ...] = (
    Metric("act_std", "act std", _act_std),
    Metric("grad_rms", "grad rms", _grad_rms),
    Metric("grad_norm", "grad norm", _grad_norm),
    Metric("dead_fraction", "dead", lambda layer: layer.dead_fraction, share=True),
    Metric("saturation", "saturated", lambda layer: layer.saturation, share=True),
    Metric("update_ratio", "update ratio", lambda layer: layer.update_ratio),
    Metric("nonfinite", "non-finite", _nonfinite),
)

# A change worth a mark in the table: a magnitude moved by at least this factor, or a share by this much.
RATIO_NOTABLE = 2.0
SHARE_NOTABLE = 0.1


@dataclass(frozen=True, slots=True)
class Change:
    """One metric of one layer in both runs (None where the run did not measure it)."""

    metric: str
    before: float | None
    after: float | None

    @property
    def ratio(self) -> float | None:
        """after / before for magnitudes (None when undefined: a missing value, or zero before)."""
        if self.before is None or self.after is None or self.before == 0 or math.isnan(self.before):
            return None
        return self.after / self.before

    @property
    def notable(self) -> bool:
        """Moved by at least RATIO_NOTABLE (SHARE_NOTABLE for shares), appeared, vanished, or turned non-finite."""
        b, a = self.before, self.after
        if b is None or a is None:
            return b is not a
        if math.isnan(b) or math.isnan(a):
            return math.isnan(b) != math.isnan(a)
        metric = next((m for m in METRICS if m.name == self.metric), None)
        if metric is not None and metric.share:
            return abs(a - b) >= SHARE_NOTABLE
        if self.metric == "nonfinite":
            return a != b
        if b == 0 or a == 0:
            return a != b
        ratio = a / b
        return ratio >= RATIO_NOTABLE or ratio <= 1 / RATIO_NOTABLE


@dataclass(frozen=True, slots=True)
class LayerDiff:
    """A layer both runs have, in the after-run's forward order."""

    label: str
    type: str
    changes: tuple[Change, ...]

    def change(self, metric: str) -> Change:
        return next(c for c in self.changes if c.metric == metric)

    @property
    def notable(self) -> bool:
        return any(c.notable for c in self.changes)


@dataclass(frozen=True, slots=True)
class RunDiff:
    """What `compare` found. `appeared` holds the after-run's findings that are new or more severe than before;
    `went_away` the before-run's findings the after-run no longer has; `remained` the after-run's others."""

    before: Report
    after: Report
    layers: tuple[LayerDiff, ...]
    only_before: tuple[str, ...]
    only_after: tuple[str, ...]
    appeared: tuple[Finding, ...]
    went_away: tuple[Finding, ...]
    remained: tuple[Finding, ...]

    @property
    def changed(self) -> bool:
        return bool(self.appeared or self.went_away or self.only_before or self.only_after) or any(
            layer.notable for layer in self.layers
        )


def _by_label(report: Report) -> dict[str, LayerStats]:
    out: dict[str, LayerStats] = {}
    for layer in report.layers:
        out.setdefault(layer.label, layer)
    return out


def _check_same_model(before: Report, after: Report, names: tuple[str, str]) -> None:
    b_name, a_name = names
    if before.model.name != after.model.name:
        raise DifferentModelsError(
            f"{b_name} and {a_name} are runs of different models: {before.model.name} "
            f"({len(before.layers)} layers, {before.model.parameters:,} parameters) vs {after.model.name} "
            f"({len(after.layers)} layers, {after.model.parameters:,} parameters)"
        )
    b, a = _by_label(before), _by_label(after)
    for label, layer in a.items():
        other = b.get(label)
        if other is not None and other.type != layer.type:
            raise DifferentModelsError(
                f"{b_name} and {a_name} are runs of different models: layer {label!r} is {other.type} in "
                f"{b_name} but {layer.type} in {a_name}"
            )
    if b and a and not set(a) & set(b):
        raise DifferentModelsError(
            f"{b_name} and {a_name} are runs of different models: they share no layer name "
            f"({b_name} has {', '.join(list(b)[:3])}, ...; {a_name} has {', '.join(list(a)[:3])}, ...)"
        )


def _key(f: Finding) -> tuple[str, str | None]:
    return (f.code, f.layer)


def compare(before: Report, after: Report, names: tuple[str, str] = ("BEFORE", "AFTER")) -> RunDiff:
    """Compare two runs of the same model (`names` label them in messages, e.g. their file names).

    Raises DifferentModelsError (a ValueError) naming what differs when they are runs of different models.
    """
    _check_same_model(before, after, names)
    b, a = _by_label(before), _by_label(after)
    layers = tuple(
        LayerDiff(
            label=label,
            type=layer.type,
            changes=tuple(Change(m.name, m.read(b[label]), m.read(layer)) for m in METRICS),
        )
        for label, layer in a.items()
        if label in b
    )
    before_found = {_key(f): f for f in before.findings}
    after_keys = {_key(f) for f in after.findings}
    appeared: list[Finding] = []
    remained: list[Finding] = []
    for f in after.findings:  # keeps the after-run's ranking
        old = before_found.get(_key(f))
        (appeared if old is None or f.rank > old.rank else remained).append(f)
    went_away = tuple(f for f in before.findings if _key(f) not in after_keys)
    return RunDiff(
        before=before,
        after=after,
        layers=layers,
        only_before=tuple(label for label in b if label not in a),
        only_after=tuple(label for label in a if label not in b),
        appeared=tuple(appeared),
        went_away=went_away,
        remained=tuple(remained),
    )
