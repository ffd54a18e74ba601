"""The bounded history of a watched run: per-step scalars and histogram snapshots, thinned evenly so that memory
and report size stay bounded however long the run."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from actdiag.metrics import LAYER_METRICS, PARAM_METRICS, StepScalars, step_scalars
from actdiag.records import ExponentHistogram, Histogram, History, StepRecord

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


class _ScalarRow:
    """A kept step's series values (`metrics.StepScalars` without the rest): arrays and the labels' tuples, shared
    with the row before when they are equal (a run's layers rarely change)."""

    __slots__ = ("labels", "layers", "names", "params")

    labels: tuple[str, ...]
    names: tuple[str, ...]
    layers: np.ndarray
    params: np.ndarray

    def __init__(self, sc: StepScalars, before: _ScalarRow | None) -> None:
        self.labels = before.labels if before is not None and before.labels == sc.labels else sc.labels
        self.names = before.names if before is not None and before.names == sc.names else sc.names
        self.layers, self.params = sc.layers, sc.params


class HistoryBuffer:
    """Mutable, bounded history of recorded steps; `snapshot()` gives the frozen History."""

    def __init__(self, max_points: int = DEFAULT_MAX_HISTORY, max_hist: int = DEFAULT_MAX_HIST_SNAPSHOTS) -> None:
        self.scalars = _Series(max_points)
        self.hists = _Series(max_hist)

    def add(self, record: StepRecord) -> None:
        # A step a series will not keep is only counted: its row is never built (nor, for a record the recorder
        # defers, its TensorStats: the scalars and histograms come from the step's arrays, `metrics.StepScalars`).
        scalars_due, hists_due = self.scalars.due(), self.hists.due()
        sc = step_scalars(record) if scalars_due or hists_due else None
        before = self.scalars.rows[-1] if self.scalars.rows else None
        self.scalars.offer(record.step, _ScalarRow(sc, before) if sc is not None and scalars_due else None)
        self.hists.offer(record.step, sc.histograms() if sc is not None and hists_due else ())

    def snapshot(self) -> History:
        rows: list[_ScalarRow] = self.scalars.rows
        labels: dict[str, None] = {}
        pnames: dict[str, None] = {}
        for row in rows:
            labels.update(dict.fromkeys(row.labels))
            pnames.update(dict.fromkeys(row.names))
        layers = _columns(labels, [(row.labels, row.layers) for row in rows], LAYER_METRICS)
        params = _columns(pnames, [(row.names, row.params) for row in rows], PARAM_METRICS)
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


def _columns(
    names: dict[str, None], rows: list[tuple[tuple[str, ...], np.ndarray]], metrics: tuple[str, ...]
) -> dict[str, dict[str, tuple[float, ...]]]:
    """Per name, per metric, its series over `rows` ((names, [N, len(metrics)] values) per step; NaN where a step
    has no such name)."""
    missing = [math.nan] * len(metrics)
    series: dict[str, list[list[float]]] = {name: [] for name in names}
    for row_names, values in rows:
        got = dict(zip(row_names, values.tolist(), strict=True))
        for name, column in series.items():
            column.append(got.get(name, missing))
    return {name: {m: tuple(v[k] for v in vals) for k, m in enumerate(metrics)} for name, vals in series.items()}
