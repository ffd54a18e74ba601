"""Library-default architectures, randomly initialised from small configs: healthy by construction, so no rule may
raise a warning or an error about them, one-shot or over a short training run (with and without a learning rate
decayed linearly to zero, the Hugging Face Trainer's default schedule). Infos are allowed only where they change a
decision; none is expected here either.

Each watch checks, with plain torch, that the run it judges did train (the loss fell on its repeated batches) and,
under the schedule, that the last steps moved the weights an order of magnitude less than the first: the situation
in which a rule blind to the schedule would cry "stalled".
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

import actdiag
from actdiag.records import Finding
from tests.realworld.models import REAL_MODELS, RealModel, call

pytestmark = pytest.mark.slow

STEPS = 40
EVERY = 4
LR = 1e-3


def loud(findings: tuple[Finding, ...]) -> list[tuple[str, str | None, str]]:
    return [(f.code, f.layer, f.message) for f in findings if f.severity != "info"]


def noted(findings: tuple[Finding, ...]) -> list[tuple[str, str | None, str]]:
    return [(f.code, f.layer, f.message) for f in findings]


def inputs_and_loss(rm: RealModel, i: int = 0) -> tuple[Any, Any]:
    batch = rm.batch(i)
    inputs = batch if isinstance(batch, dict) else batch[0]
    return inputs, lambda output, _inputs: rm.loss(output, batch)


@pytest.fixture(autouse=True)
def _quiet_library_warnings() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@pytest.mark.parametrize("rm", REAL_MODELS, ids=lambda m: m.name)
def test_inspect_is_quiet(rm: RealModel) -> None:
    model = rm.build()
    inputs, loss_fn = inputs_and_loss(rm)
    assert noted(actdiag.inspect(model, inputs, loss_fn=loss_fn).findings) == []
    # Without a loss: a random unit gradient at every output, as the CLI does for a file without loss_fn().
    assert loud(actdiag.inspect(model, inputs).findings) == []


@pytest.mark.parametrize("rm", REAL_MODELS, ids=lambda m: m.name)
def test_inspect_five_adam_steps_is_quiet(rm: RealModel) -> None:
    model = rm.build()
    inputs, loss_fn = inputs_and_loss(rm)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    report = actdiag.inspect(model, inputs, loss_fn=loss_fn, steps=5, optimizer=opt)
    assert report.run.recorded_steps == 5
    assert noted(report.findings) == []


def _watch(rm: RealModel, schedule: bool) -> tuple[list[Finding], list[float], list[float]]:
    model = rm.build()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / STEPS) if schedule else None
    first = next(p for p in model.parameters() if p.requires_grad and p.dim() >= 2)
    losses: list[float] = []
    moved: list[float] = []  # ||W_after - W_before|| of one weight matrix, measured around each step
    with actdiag.watch(model, every=EVERY) as monitor:
        for i in range(STEPS):
            batch = rm.batch(i % 4)
            loss = rm.loss(call(model, batch), batch)
            loss.backward()
            before = first.detach().clone()
            opt.step()
            moved.append((first.detach() - before).norm().item())
            opt.zero_grad()
            if sched is not None:
                sched.step()
            losses.append(loss.item())
            monitor.step()
    return list(monitor.findings), losses, moved


@pytest.mark.parametrize("rm", REAL_MODELS, ids=lambda m: m.name)
def test_adamw_watch_is_quiet(rm: RealModel) -> None:
    findings, losses, _ = _watch(rm, schedule=False)
    assert sum(losses[-4:]) < sum(losses[:4])  # it trained on its four repeated batches
    assert noted(tuple(findings)) == []


@pytest.mark.parametrize("rm", REAL_MODELS, ids=lambda m: m.name)
def test_adamw_watch_with_linear_decay_to_zero_is_quiet(rm: RealModel) -> None:
    findings, losses, moved = _watch(rm, schedule=True)
    assert sum(losses[-4:]) < sum(losses[:4])
    assert moved[-1] < moved[1] / 10  # the schedule has all but stopped the updates
    assert noted(tuple(findings)) == []


def test_the_zoo_holds_what_it_promises() -> None:
    """The residual ResNet's last BatchNorm of each block starts at zero and ConvNeXt's layer scale at 1e-6: the
    near-zero parameters the update rules must judge by absolute step, here for real."""
    by_name = {rm.name: rm for rm in REAL_MODELS}
    resnet = by_name["resnet18"].build()
    assert all(float(m.weight.abs().max()) == 0.0 for n, m in resnet.named_modules() if n.endswith("bn2"))
    convnext = by_name["convnext"].build()
    scales = [p for n, p in convnext.named_parameters() if "layer_scale" in n]
    assert scales and all(float(p.abs().max()) <= 1e-6 for p in scales)
    assert isinstance(by_name["unet"].build(), nn.Module)
