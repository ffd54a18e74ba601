"""The one wrap of the user's code: what each stage's failure says, and what is blamed on actdiag instead."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from actdiag.errors import TargetError
from actdiag.metrics import layer_metrics
from actdiag.usercode import FORWARD, LOSS, Stage, run_user


def test_an_exception_becomes_a_target_error_with_its_stage_and_cause() -> None:
    boom = ValueError("weights file not found\nsecond line")

    def build_model() -> nn.Module:
        raise boom

    with pytest.raises(TargetError) as info:
        run_user(Stage("build", "build_model()"), build_model)
    assert str(info.value).startswith("build_model() raised ValueError: weights file not found (at ")
    assert "test_usercode.py line" in str(info.value) and "second line" not in str(info.value)
    assert (info.value.stage, info.value.cause) == ("build", boom)
    assert info.value.__cause__ is boom


def test_sys_exit_is_a_target_error_too() -> None:
    def exit(code: int | None = None) -> None:  # noqa: A001 - what the user's code calls
        sys.exit(code)

    with pytest.raises(TargetError, match=r"^build_model\(\) called sys.exit\(3\)"):
        run_user(Stage("build", "build_model()"), lambda: exit(3))
    with pytest.raises(TargetError, match=r"^the model's code called sys.exit\(\) while running"):
        run_user(LOSS, lambda: exit())


def test_the_forward_pass_names_the_layer_it_failed_in() -> None:
    model = nn.Sequential(nn.Linear(10, 5), nn.Tanh())
    with pytest.raises(TargetError) as info:
        run_user(FORWARD, model, torch.randn(4, 12))
    assert str(info.value).startswith("the forward pass failed in layer '0' (Linear(in_features=10, out_features=5")
    assert "which got (4, 12) float32: RuntimeError: mat1 and mat2" in str(info.value)
    assert info.value.stage == "forward"


def test_keyboard_interrupt_and_target_errors_pass_through() -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_user(FORWARD, interrupted)
    inner = TargetError("already worded")
    with pytest.raises(TargetError) as info:
        run_user(FORWARD, lambda: (_ for _ in ()).throw(inner))
    assert info.value is inner


def test_a_failure_in_actdiags_own_code_while_the_model_runs_is_not_blamed_on_the_model() -> None:
    class CallsIntoActdiag(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            layer_metrics(None)  # type: ignore[arg-type] - raises inside actdiag's own frames
            return x

    with pytest.raises(RuntimeError, match="^actdiag failed while recording the run: AttributeError"):
        run_user(FORWARD, CallsIntoActdiag(), torch.randn(2))
    # Outside the running stages (import, build) the same exception is the user's.
    with pytest.raises(TargetError, match=r"^build_model\(\) raised AttributeError"):
        run_user(Stage("build", "build_model()"), lambda: layer_metrics(None))  # type: ignore[arg-type]
