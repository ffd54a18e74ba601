"""Faults inside actdiag never stop training (one warning, that part switched off); strict=True raises; bad paths
fail at the start of watch, naming the path."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

import actdiag
import actdiag.hooks.recorder as recorder_mod
import actdiag.rules as rules_mod
from actdiag.errors import ReportPathError
from actdiag.records import Report, StepRecord


class Boom(Exception):
    """Stands in for a bug in actdiag."""


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def _train(model: nn.Module, steps: int = 5, **watch: Any) -> tuple[actdiag.Monitor, list[warnings.WarningMessage]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with actdiag.watch(model, every=1, **watch) as monitor:
            for _ in range(steps):
                model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                monitor.step()
    return monitor, [w for w in caught if "actdiag" in str(w.message)]


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _unwatched_params(steps: int = 5) -> list[torch.Tensor]:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return _params(model)


def test_rel_hook_fault_warns_once_and_only_that_part_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise Boom("activation hook bug")

    monkeypatch.setattr(recorder_mod.Recorder, "_record_output", broken)
    model = _mlp()
    monitor, caught = _train(model)
    assert len(caught) == 1
    assert "activations" in str(caught[0].message) and "Boom" in str(caught[0].message)
    # training went on, exactly as without actdiag
    for a, b in zip(_params(model), _unwatched_params()):
        assert torch.equal(a, b)
    # the other parts kept recording: weights and their gradients of every step
    assert monitor.recorded_steps == 5
    assert monitor.latest is not None and monitor.latest.params
    assert all(p.grad is not None for p in monitor.latest.params)


def test_rel_gradient_hook_fault_inside_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = recorder_mod.Recorder._put_stats

    def broken(self: Any, key: tuple[str, ...], *args: Any) -> None:
        if key[-1] == "act":  # outputs are measured in the forward pass: keep them, break what backward measures
            return original(self, key, *args)
        calls["n"] += 1
        raise Boom("gradient hook bug")

    def broken_together(self: Any, keys: list[Any], *args: Any) -> None:  # small weights, taken together
        calls["n"] += 1
        raise Boom("gradient hook bug")

    monkeypatch.setattr(recorder_mod.Recorder, "_put_stats", broken)
    monkeypatch.setattr(recorder_mod.HostBatch, "take_many", broken_together)
    model = _mlp()
    _, caught = _train(model)
    parts = sorted(str(w.message).split(":")[1].split(" failed")[0].strip() for w in caught)
    assert parts == ["gradients", "weight gradients", "weights"]  # each part once, then switched off
    assert calls["n"] == 3
    for a, b in zip(_params(model), _unwatched_params()):
        assert torch.equal(a, b)


def test_rel_strict_raises_from_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise Boom("activation hook bug")

    monkeypatch.setattr(recorder_mod.Recorder, "_record_output", broken)
    with pytest.raises(Boom):
        _train(_mlp(), strict=True)


def test_rel_read_back_fault_stops_recording_and_removes_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise Boom("decode bug")

    monkeypatch.setattr(recorder_mod, "read_back", broken)
    model = _mlp()
    monitor, caught = _train(model)
    assert len(caught) == 1 and "recording" in str(caught[0].message)
    assert monitor.recorded_steps == 0
    assert all(not m._forward_hooks for m in model.modules())
    assert not _global_forward_hooks and not _global_forward_pre_hooks  # torch's global ones
    for a, b in zip(_params(model), _unwatched_params()):
        assert torch.equal(a, b)
    with pytest.raises(Boom):
        _train(_mlp(), strict=True)


def test_rel_rule_fault_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise Boom("rule bug")

    monkeypatch.setattr(rules_mod, "diagnose", broken)
    monitor, _ = _train(_mlp())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert monitor.findings == ()
        assert monitor.findings == ()
    assert len([w for w in caught if "rules" in str(w.message)]) == 1
    strict, _ = _train(_mlp(), strict=True)
    with pytest.raises(Boom):
        strict.findings  # noqa: B018


class _FlakySink:
    def __init__(self) -> None:
        self.records = 0
        self.closed = 0

    def on_record(self, record: StepRecord) -> None:
        self.records += 1
        if self.records == 2:
            raise Boom("sink bug")

    def on_close(self, report: Report) -> None:
        self.closed += 1


class _GoodSink:
    def __init__(self) -> None:
        self.records = 0
        self.closed = 0

    def on_record(self, record: StepRecord) -> None:
        self.records += 1

    def on_close(self, report: Report) -> None:
        self.closed += 1


def test_rel_sink_fault_switches_off_that_sink_only() -> None:
    flaky, good = _FlakySink(), _GoodSink()
    model = _mlp()
    _, caught = _train(model, sinks=[flaky, good])
    assert len(caught) == 1 and "_FlakySink" in str(caught[0].message)
    assert flaky.records == 2 and flaky.closed == 0  # stopped after its failure
    assert good.records == 5 and good.closed == 1
    for a, b in zip(_params(model), _unwatched_params()):
        assert torch.equal(a, b)
    with pytest.raises(Boom):
        _train(_mlp(), sinks=[_FlakySink()], strict=True)


def test_rel_unwritable_logdir_fails_at_start_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad = blocker / "runs"
    model = _mlp()
    with pytest.raises(ReportPathError, match="logdir") as info:
        actdiag.watch(model, logdir=bad)
    assert str(bad) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert all(not m._forward_hooks for m in model.modules())  # nothing attached
    assert not _global_forward_hooks and not _global_forward_pre_hooks  # torch's global ones


@pytest.mark.parametrize("which", ["report_json", "report_html"])
def test_rel_unwritable_report_path_fails_at_start_naming_it(tmp_path: Path, which: str) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for bad in (blocker / "out.json", tmp_path):  # under a file; a directory
        with pytest.raises(ReportPathError) as info:
            actdiag.watch(_mlp(), **{which: bad})
        assert str(bad) in str(info.value) and which in str(info.value)


def test_rel_report_json_written_on_exception(tmp_path: Path) -> None:
    import json

    target = tmp_path / "deep" / "report.json"
    model = _mlp()
    with pytest.raises(Boom), actdiag.watch(model, every=1, report_json=target) as monitor:
        for i in range(4):
            model(torch.randn(4, 6)).sum().backward()
            monitor.step()
            if i == 2:
                raise Boom("the user's training crashed")
    doc = json.loads(target.read_text())
    assert doc["run"]["steps"] == 3
    assert [layer["name"] for layer in doc["layers"]] == ["0", "1", "2"]
