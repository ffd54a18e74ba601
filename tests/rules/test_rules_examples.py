"""The examples run at their small size and show what they promise."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"actdiag_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_weight_init_classic_settings_with_try_fixes() -> None:
    """The classic settings at a small width (gains matched to 4096 wide): each gives exactly the expected codes
    (and, beside a collapse, the vanishing gradient it causes, linked to it), and the first fix of each finding is
    the expected init, verified on a copy."""
    weight_init = load("weight_init")
    reports = weight_init.run(width=64, try_fixes=True)
    for setting, report in zip(weight_init.SETTINGS, reports, strict=True):
        mirrored = [f for f in report.findings if f.code == "vanishing_gradient" and "activation_collapse" in f.related]
        rest = tuple(f.code for f in report.findings if f not in mirrored)
        assert rest == setting.expect, setting.name
        assert not mirrored or setting.expect == ("activation_collapse",), setting.name
        for f in report.findings:
            assert f.fixes[0].code == setting.expect_fix, setting.name
            assert f.fixes[0].verified is True, (setting.name, f.fixes[0].text)


def test_weight_init_main_prints_each_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    weight_init = load("weight_init")
    monkeypatch.setenv("ACTDIAG_SMALL", "1")
    assert weight_init.main(["--width", "48"]) == 0
    out = capsys.readouterr().out
    assert "MLP 48 wide" in out
    for setting in weight_init.SETTINGS:
        assert setting.name in out
    assert out.count("expected: nothing; found: nothing") == 3
    assert "expected: activation_collapse; found: activation_collapse" in out


def test_optimizers_small(capsys: pytest.CaptureFixture[str]) -> None:
    optimizers = load("optimizers")
    assert optimizers.main(["--small"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:] if line and not line.startswith(" ")}
    assert set(rows) == set(optimizers.OPTIMIZERS)
    decay = {name: float(row[4]) for name, row in rows.items()}
    assert decay["SGD"] == pytest.approx(1.0)  # plain SGD's effective step is its learning rate
    assert decay["AdaGrad"] < 0.1  # ~1/sqrt(steps): AdaGrad's running sum of squared gradients
    assert min(decay["SGD"], decay["Momentum"], decay["Nesterov"], decay["Adadelta"]) > 0.3
    for row in rows.values():
        assert all(float(v) > 0 for v in row[1:4])  # every optimizer moved its weights


def test_optimizers_adagrad_stalls_in_a_long_run() -> None:
    """The textbook case, run long enough (3000 steps) for AdaGrad's effective learning rate to decay: AdaGrad
    stalls, the others do not."""
    optimizers = load("optimizers")
    results = {name: optimizers.train(name, steps=3000, every=100) for name in ("SGD", "AdaGrad", "Adam")}
    codes = {name: [f.code for f in r.findings] for name, r in results.items()}
    assert "stalled_updates" in codes["AdaGrad"]
    assert codes["SGD"] == [] and codes["Adam"] == []
