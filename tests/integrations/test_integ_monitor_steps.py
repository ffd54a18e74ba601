"""The Monitor pieces the framework callbacks stand on: end_step/begin_step around evaluation, read_gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import actdiag


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(5, 6)).pow(2).mean().backward()
    opt.step()


def test_integ_forward_between_end_and_begin_is_not_recorded() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with actdiag.watch(model, every=1) as monitor:
        for _ in range(3):
            monitor.begin_step()
            monitor.begin_step()  # idempotent: a second call must not restart the step
            _train_step(model, opt)
            monitor.end_step()
            with torch.no_grad():  # an "evaluation" pass between training steps
                model(torch.randn(7, 6))
    assert monitor.steps == 3
    assert monitor.recorded_steps == 3
    latest = monitor.latest
    assert latest is not None
    # one call per layer and the batch of the training step, not the evaluation's batch of 7
    assert [layer.label for layer in latest.layers] == ["0", "1", "2"]
    assert all(layer.shape[0] == 5 for layer in latest.layers)


def test_integ_step_still_records_evaluation_passes_when_not_split() -> None:
    """Control for the test above: with plain step() the hooks stay on between steps and see the extra pass."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with actdiag.watch(model, every=1) as monitor:
        _train_step(model, opt)
        with torch.no_grad():
            model(torch.randn(7, 6))
        monitor.step()
    assert monitor.latest is not None
    assert "0#1" in [layer.label for layer in monitor.latest.layers]


def test_integ_read_gradients_sees_gradients_changed_after_backward() -> None:
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with actdiag.watch(model, every=1) as monitor:
        opt.zero_grad()
        model(torch.randn(5, 6)).pow(2).mean().backward()
        for p in model.parameters():  # what an AMP unscale or clipping does between backward and step
            assert p.grad is not None
            p.grad.mul_(0.25)
        monitor.read_gradients()
        final = {name: p.grad.detach().double().numpy().copy() for name, p in model.named_parameters()}
        opt.step()
        monitor.end_step()
    latest = monitor.latest
    assert latest is not None
    for ps in latest.params:
        assert ps.grad is not None
        ref = final[ps.name]
        assert ps.grad.mean == pytest.approx(ref.mean(), rel=1e-5, abs=1e-9)
        assert ps.grad.norm == pytest.approx(np.linalg.norm(ref), rel=1e-5)


def test_integ_step_methods_outside_watch_raise() -> None:
    monitor = actdiag.watch(_net())
    with pytest.raises(RuntimeError):
        monitor.begin_step()
    with pytest.raises(RuntimeError):
        monitor.end_step()
