"""The bounded history of a watched run: per-step scalars and histogram snapshots, thinned evenly so that memory
and report size stay bounded however long the run."""

from __future__ import annotations

import math
from typing import Any

from actdiag.metrics import LAYER_METRICS, PARAM_METRICS, layer_metrics, param_metrics
from actdiag.records import ExponentHistogram, Histogram, History, StepRecord, _packed_exponents, _packed_histograms

DEFAULT_MAX_HISTORY = 512
DEFAULT_MAX_HIST_SNAPSHOTS = 64


class _Series:
    """Parallel lists thinned to at most `cap` points: when full, every other point is dropped and the stride at
    which new points are kept doubles, so a run of any length keeps an evenly spread, bounded history."""

    def __init__(self, cap: int) -> None:
        self.cap = max(cap, 2)
        self.stride = 1
        self.seen = 0
        self.steps: list[int] = []
        self.rows: list[Any] = []

    def due(self) -> bool:
        """Whether the next `offer` keeps its row."""
        return self.seen % self.stride == 0

    def offer(self, step: int, row: Any) -> None:
        take = self.due()
        self.seen += 1
        if not take:
            return
        self.steps.append(step)
        self.rows.append(row)
        if len(self.steps) >= self.cap:
            self.steps = self.steps[::2]
            self.rows = self.rows[::2]
            self.stride *= 2


def _scalar_row(record: StepRecord) -> dict[str, Any]:
    return {
        "layers": {layer.label: layer_metrics(layer) for layer in record.layers},
        "params": {p.name: param_metrics(p) for p in record.params},
    }


def _hist_row(record: StepRecord) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Per layer label: its activation histogram, activation exponents and gradient exponents (None where it has
    none), each packed (`records._Counts._pack`) into a flat tuple of numbers, None and a copy of the counts' row.
    The collector stops tracking such tuples at their first collection (a tuple of tuples needs a second one), and
    they hold none of the step's arrays; `snapshot` builds the histograms."""
    hists: dict[str, Any] = {}
    aexps: dict[str, Any] = {}
    gexps: dict[str, Any] = {}
    for layer in record.layers:
        a, g, label = layer.activation, layer.gradient, layer.label
        hists[label], aexps[label] = _packed_histograms(a) if a else (None, None)
        gexps[label] = _packed_exponents(g) if g else None
    return hists, aexps, gexps


class HistoryBuffer:
    """Mutable, bounded history of recorded steps; `snapshot()` gives the frozen History."""

    def __init__(self, max_points: int = DEFAULT_MAX_HISTORY, max_hist: int = DEFAULT_MAX_HIST_SNAPSHOTS) -> None:
        self.scalars = _Series(max_points)
        self.hists = _Series(max_hist)

    def add(self, record: StepRecord) -> None:
        # A step a series will not keep is only counted: its row is never built.
        self.scalars.offer(record.step, _scalar_row(record) if self.scalars.due() else {})
        self.hists.offer(record.step, _hist_row(record) if self.hists.due() else ())

    def snapshot(self) -> History:
        rows = self.scalars.rows
        labels: dict[str, None] = {}
        pnames: dict[str, None] = {}
        for row in rows:
            labels.update(dict.fromkeys(row["layers"]))
            pnames.update(dict.fromkeys(row["params"]))
        nan_layer = dict.fromkeys(LAYER_METRICS, math.nan)
        nan_param = dict.fromkeys(PARAM_METRICS, math.nan)
        layers = {
            label: {m: tuple(row["layers"].get(label, nan_layer)[m] for row in rows) for m in LAYER_METRICS}
            for label in labels
        }
        params = {
            name: {m: tuple(row["params"].get(name, nan_param)[m] for row in rows) for m in PARAM_METRICS}
            for name in pnames
        }
        hrows = self.hists.rows
        hlabels: dict[str, None] = {}
        for hrow in hrows:
            hlabels.update(dict.fromkeys(hrow[0]))

        def column(label: str, i: int, kind: type[Histogram] | type[ExponentHistogram]) -> tuple[Any, ...]:
            packed = (r[i].get(label) for r in hrows)
            return tuple(None if p is None else kind._unpack(p) for p in packed)

        act: dict[str, tuple[Histogram | None, ...]] = {lb: column(lb, 0, Histogram) for lb in hlabels}
        aexp: dict[str, tuple[ExponentHistogram | None, ...]] = {lb: column(lb, 1, ExponentHistogram) for lb in hlabels}
        gexp: dict[str, tuple[ExponentHistogram | None, ...]] = {lb: column(lb, 2, ExponentHistogram) for lb in hlabels}
        return History(
            steps=tuple(self.scalars.steps),
            layers=layers,
            params=params,
            hist_steps=tuple(self.hists.steps),
            activation_histograms=act,
            activation_exponents=aexp,
            gradient_exponents=gexp,
        )
