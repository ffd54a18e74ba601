"""Comparing two runs (actdiag.reports.diff.compare): layers matched by name, findings appeared / went away,
notable changes, and runs of different models refused with a message naming what differs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from actdiag.records import Finding, LayerStats, ModelInfo, Report, RunInfo
from actdiag.reports.diff import DifferentModelsError, compare
from tests.rules.factory import ts


def _layer(name: str, kind: str, std: float, grad: float, dead: float | None = None) -> LayerStats:
    return LayerStats(
        name=name, type=kind, step=0, activation=ts(std=std), gradient=ts(std=grad, mean=0.0), dead_fraction=dead
    )


def _report(layers: list[LayerStats], findings: tuple[Finding, ...] = (), name: str = "Net") -> Report:
    return Report(
        model=ModelInfo(name=name, parameters=100),
        run=RunInfo(steps=1, recorded_steps=1, device="cpu", torch="x", actdiag="y"),
        layers=tuple(layers),
        findings=findings,
    )


def _finding(code: str, layer: str | None, severity: str = "warning") -> Finding:
    return Finding(code=code, severity=severity, layer=layer, message=f"{code} at {layer}")  # type: ignore[arg-type]


BASE = [
    _layer("fc1", "Linear", 1.0, 1e-2),
    _layer("act1", "ReLU", 0.6, 1e-2, dead=0.1),
    _layer("fc2", "Linear", 0.5, 2e-2),
]


def test_changes_are_the_numbers_of_both_runs() -> None:
    after = [
        _layer("fc1", "Linear", 1.0, 1e-5),
        _layer("act1", "ReLU", 0.55, 1e-5, dead=0.9),
        _layer("fc2", "Linear", 0.5, 2e-2),
    ]
    diff = compare(_report(BASE), _report(after))
    fc1, act1, fc2 = diff.layers
    rms = fc1.change("grad_rms")
    assert rms.before == pytest.approx(np.sqrt(1e-2**2)) and rms.after == pytest.approx(1e-5)
    assert rms.ratio == pytest.approx(1e-3)
    assert rms.notable and not fc1.change("act_std").notable
    assert act1.change("dead_fraction").notable  # 10% -> 90%
    assert not fc2.notable
    assert diff.changed


@pytest.mark.parametrize(
    ("before", "after", "notable"),
    [(1.0, 1.9, False), (1.0, 2.0, True), (1.0, 0.5, True), (1.0, 0.51, False), (0.0, 1e-9, True), (0.0, 0.0, False)],
)
def test_notable_magnitudes(before: float, after: float, notable: bool) -> None:
    diff = compare(_report([_layer("a", "Linear", before, 1.0)]), _report([_layer("a", "Linear", after, 1.0)]))
    assert diff.layers[0].change("act_std").notable is notable


@pytest.mark.parametrize(("before", "after", "notable"), [(0.1, 0.19, False), (0.1, 0.2, True), (0.5, 0.0, True)])
def test_notable_shares(before: float, after: float, notable: bool) -> None:
    b = _report([_layer("a", "ReLU", 1.0, 1.0, dead=before)])
    a = _report([_layer("a", "ReLU", 1.0, 1.0, dead=after)])
    assert compare(b, a).layers[0].change("dead_fraction").notable is notable


def test_findings_appeared_went_away_remained_and_worsened() -> None:
    before = (_finding("saturation", "fc1"), _finding("dead_relu", "act1"), _finding("fp16_underflow", None, "info"))
    after = (
        _finding("dead_relu", "act1", "error"),  # worse: counts as appeared
        _finding("vanishing_gradient", "fc1"),  # new
        _finding("fp16_underflow", None, "info"),  # same
        _finding("saturation", "fc2"),  # same code, another layer: new
    )
    diff = compare(_report(BASE, before), _report(BASE, after))
    assert [(f.code, f.layer) for f in diff.appeared] == [
        ("dead_relu", "act1"),
        ("vanishing_gradient", "fc1"),
        ("saturation", "fc2"),
    ]
    assert [(f.code, f.layer) for f in diff.went_away] == [("saturation", "fc1")]
    assert [(f.code, f.layer) for f in diff.remained] == [("fp16_underflow", None)]


def test_an_improved_severity_is_not_appeared() -> None:
    diff = compare(
        _report(BASE, (_finding("dead_relu", "act1", "error"),)), _report(BASE, (_finding("dead_relu", "act1"),))
    )
    assert diff.appeared == () and diff.went_away == () and len(diff.remained) == 1


def test_layers_added_or_removed_are_listed() -> None:
    after = [BASE[0], _layer("bn", "BatchNorm1d", 1.0, 1e-2), *BASE[1:]]
    diff = compare(_report(BASE[:2]), _report(after))
    assert diff.only_after == ("bn", "fc2") and diff.only_before == ()
    assert [layer.label for layer in diff.layers] == ["fc1", "act1"]


def test_repeated_calls_are_matched_by_label() -> None:
    twice = [BASE[0], dataclasses.replace(BASE[0], call=1, activation=ts(std=4.0))]
    diff = compare(_report(twice), _report(twice))
    assert [layer.label for layer in diff.layers] == ["fc1", "fc1#1"]
    assert diff.layers[1].change("act_std").before == pytest.approx(4.0)


def test_different_models_are_refused() -> None:
    with pytest.raises(
        DifferentModelsError, match=r"a\.json and b\.json are runs of different models: Net .* vs Other"
    ):
        compare(_report(BASE), _report(BASE, name="Other"), names=("a.json", "b.json"))
    retyped = [dataclasses.replace(BASE[0], type="Conv2d"), *BASE[1:]]
    with pytest.raises(DifferentModelsError, match="layer 'fc1' is Linear in BEFORE but Conv2d in AFTER"):
        compare(_report(BASE), _report(retyped))
    renamed = [dataclasses.replace(layer, name=f"x{i}") for i, layer in enumerate(BASE)]
    with pytest.raises(DifferentModelsError, match="share no layer name"):
        compare(_report(BASE), _report(renamed))
    assert issubclass(DifferentModelsError, ValueError)
