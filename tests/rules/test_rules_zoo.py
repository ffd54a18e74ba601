"""Real models through `actdiag.inspect`: each pathology of the zoo fires its code, healthy controls stay quiet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import actdiag
from actdiag.records import Finding, Report, TensorStats, measured_stats
from tests.zoo import (
    HEALTHY,
    PATHOLOGIES,
    CollapsingTanhNet,
    DeadReluNet,
    DeepXavierReluNet,
    HeReluNet,
    HugeActivationNet,
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
    # Numbers, but for the pass a NaN/Inf first appeared in (CONTRACT.md, "Findings over a run").
    passes = (("pass", "forward"), ("pass", "backward"))
    assert all(isinstance(v, float) or (k, v) in passes for k, v in f.evidence.items())


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


def _watched_once(model: nn.Module, sample_cap: int) -> Report:
    inputs = example(model)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    torch.manual_seed(0)
    with actdiag.watch(model, every=1, sample_cap=sample_cap, track_updates=False) as mon:
        out = model(*args)
        out = out if isinstance(out, torch.Tensor) else out[0]
        out.backward(torch.randn_like(out))
        mon.step()
    return mon.report()


def _measured(report: Report) -> list[TensorStats]:
    return measured_stats(report.layers, report.params)


# NaNNet: non-finite tensors always take the exact path (test below); HugeActivationNet: no tensor over 256 elements.
_ESTIMABLE = [c for c in [*PATHOLOGIES, *HEALTHY] if c not in (NaNNet, HugeActivationNet)]


@pytest.mark.parametrize("cls", _ESTIMABLE, ids=lambda c: c.__name__)
def test_estimated_statistics_find_the_same(cls: type[nn.Module]) -> None:
    """Every pathology and healthy control, recorded at every=1 with a sample of 256 elements, so that the spread,
    extremes and zeros of the larger tensors are estimated: the same codes as the exact one-shot inspection."""
    exact = {f.code for f in inspect(cls()).findings}
    report = _watched_once(cls(), sample_cap=256)
    assert any(s.estimated for s in _measured(report))
    assert {f.code for f in report.findings} == exact


def test_estimated_mode_keeps_nonfinite_tensors_exact() -> None:
    report = _watched_once(NaNNet(), sample_cap=4)
    bad = [s for s in _measured(report) if s.nonfinite_count]
    assert bad and not any(s.estimated for s in bad)
    assert any(s.estimated for s in _measured(report) if not s.nonfinite_count)
    assert only(report, "nonfinite").layer == only(inspect(NaNNet()), "nonfinite").layer
