"""Real models through `actdiag.inspect`: each pathology of the zoo fires its code, healthy controls stay quiet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import actdiag
from actdiag.records import Finding, Report
from tests.zoo import (
    HEALTHY,
    PATHOLOGIES,
    CollapsingTanhNet,
    DeadReluNet,
    DeepXavierReluNet,
    HeReluNet,
    NaNNet,
    SaturatedTanhNet,
    XavierTanhNet,
    example,
)


def inspect(model: nn.Module, **kw: object) -> Report:
    return actdiag.inspect(model, example(model), **kw)  # type: ignore[arg-type]


def only(report: Report, code: str) -> Finding:
    found = [f for f in report.findings if f.code == code]
    assert len(found) == 1, [f.code for f in report.findings]
    return found[0]


@pytest.mark.parametrize("cls", list(PATHOLOGIES), ids=lambda c: c.__name__)
def test_pathology_fires_its_code(cls: type[nn.Module]) -> None:
    report = inspect(cls())
    f = only(report, PATHOLOGIES[cls])
    assert f.layer is not None
    assert f.fixes, f"{f.code} carries no fix"
    assert all(fix.text and fix.snippet for fix in f.fixes)
    assert f.message.endswith(".")
    assert all(isinstance(v, float) for v in f.evidence.values())


@pytest.mark.parametrize("cls", HEALTHY, ids=lambda c: c.__name__)
def test_healthy_control_stays_quiet(cls: type[nn.Module]) -> None:
    report = inspect(cls())
    assert [(f.code, f.layer, f.message) for f in report.findings] == []


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("cls", [XavierTanhNet, HeReluNet], ids=lambda c: c.__name__)
def test_healthy_mlps_quiet_across_seeds(cls: type[nn.Module], seed: int) -> None:
    torch.manual_seed(seed)
    model = cls(width=64)
    report = actdiag.inspect(model, torch.randn(16, 64), seed=seed)
    assert [f.code for f in report.findings] == []


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("cls", [CollapsingTanhNet, SaturatedTanhNet, DeepXavierReluNet], ids=lambda c: c.__name__)
def test_pathologies_hold_across_seeds(cls: type[nn.Module], seed: int) -> None:
    torch.manual_seed(seed)
    model = cls(width=64)
    report = actdiag.inspect(model, torch.randn(16, 64), seed=seed)
    assert [f.code for f in report.findings] == [PATHOLOGIES[cls]]


def test_dead_relu_names_the_layer_and_suggests_leaky_relu() -> None:
    f = only(inspect(DeadReluNet()), "dead_relu")
    assert (f.layer, f.severity) == ("act2", "error")
    assert f.evidence["dead_fraction"] == 1.0
    assert [x.code for x in f.fixes][:2] == ["leaky_relu", "he_init"]
    assert "model.act2 = nn.LeakyReLU(0.01)" in f.fixes[0].snippet
    assert 'nn.init.kaiming_normal_(model.fc2.weight, nonlinearity="relu")' in f.fixes[1].snippet


def test_nonfinite_names_the_first_layer_and_suggests_checking_inputs() -> None:
    f = only(inspect(NaNNet()), "nonfinite")
    assert (f.layer, f.severity) == ("root", "error")
    assert f.related == ("head",)
    assert "check_inputs" in [x.code for x in f.fixes]


def test_collapse_in_tanh_net_suggests_xavier_with_tanh_gain() -> None:
    f = only(inspect(CollapsingTanhNet()), "activation_collapse")
    assert f.fixes[0].code == "xavier_init"
    assert 'nn.init.xavier_normal_(model[0].weight, gain=nn.init.calculate_gain("tanh"))' in f.fixes[0].snippet
    assert f.evidence["gain_per_layer"] < 0.8
    assert f.evidence["weight_gain"] == pytest.approx(0.64, rel=0.1)


def test_collapse_before_relu_suggests_he_init_over_every_layer() -> None:
    f = only(inspect(DeepXavierReluNet()), "activation_collapse")
    assert f.fixes[0].code == "he_init"
    snippet = f.fixes[0].snippet
    assert snippet.count("model[") == 20  # one entry per Linear, looped over
    assert "model[0]" in snippet and "model[38]" in snippet
    assert 'nonlinearity="relu"' in snippet
