"""`actdiag.inspect`: a one-shot check of a model on example inputs, the command line's engine.

It runs the forward and backward passes under a `Monitor` (the user's model, loss and backward each through
`actdiag.usercode.run_user`), and with `try_fixes` hands `actdiag.fixes.verify_fixes` a way to run the same check
on a patched copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from actdiag.errors import TargetError
from actdiag.fixes import verify_fixes
from actdiag.hooks.recorder import Selector, first_tensor
from actdiag.monitor import Monitor, Sink
from actdiag.records import Report
from actdiag.rules.thresholds import Thresholds, make_thresholds
from actdiag.usercode import BACKWARD, FORWARD, LOSS, describe_value, run_user

Inputs = torch.Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]
LossFn = Callable[[Any, Any], torch.Tensor]


def call_args(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """How the model is called: a tensor is one positional input, a tuple/list several, a dict keyword inputs."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every floating tensor in a (nested) output that takes part in autograd."""
    found: list[torch.Tensor] = []

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and v.requires_grad:
                found.append(v)
        elif isinstance(v, (tuple, list)):
            for item in v:
                walk(item)
        elif isinstance(v, Mapping):
            for item in v.values():
                walk(item)

    walk(output)
    return found


def forward_pass(model: nn.Module, inputs: Inputs) -> Any:
    """The model's output on `inputs`; it must hold a tensor."""
    args, kwargs = call_args(inputs)
    output = run_user(FORWARD, model, *args, **kwargs)
    if first_tensor(output) is None:
        raise TargetError(f"the model returned {describe_value(output)}, not a tensor", stage=FORWARD.name)
    return output


def backward_pass(output: Any, inputs: Inputs, loss_fn: LossFn | None, generator: torch.Generator) -> None:
    """Backward from `loss_fn(output, inputs)`, or, without one, from a random unit-variance gradient at every
    output tensor: gradient statistics then measure how the network itself propagates signal."""
    if loss_fn is not None:
        loss = run_user(LOSS, loss_fn, output, inputs)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TargetError(f"loss_fn() must return a scalar tensor, got {describe_value(loss)}", stage=LOSS.name)
        if not loss.requires_grad:
            raise TargetError(
                "loss_fn() returned a tensor that does not require grad (no parameter reaches it)", stage=LOSS.name
            )
        tensors, grads = [loss], [torch.ones_like(loss)]
    else:
        tensors = output_tensors(output)
        if not tensors:
            return
        grads = [
            torch.randn(t.shape, generator=generator, dtype=torch.float32).to(device=t.device, dtype=t.dtype)
            for t in tensors
        ]
    run_user(BACKWARD, torch.autograd.backward, tensors, grads)


def inspect(
    model: nn.Module,
    example_input: Inputs,
    *,
    loss_fn: LossFn | None = None,
    steps: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    try_fixes: bool = False,
    seed: int = 0,
    include: Selector | Iterable[Selector] | None = None,
    exclude: Selector | Iterable[Selector] | None = None,
    logdir: str | None = None,
    sinks: Iterable[Sink] = (),
    progress: Callable[[int, int], None] | None = None,
    name: str | None = None,
    thresholds: Thresholds | Mapping[str, float] | None = None,
    functional: bool = True,
) -> Report:
    """Run `steps` forward/backward passes of `model` in training mode on `example_input`, recording every step,
    and return the Report with its findings. With `optimizer`, it steps after each backward pass (on the loss, or
    on the synthetic gradient). With `try_fixes`, each suggested fix is applied to a copy of the model and checked.
    The model's training mode is restored afterwards; its gradients are left as the last pass made them.
    `thresholds` (an `actdiag.Thresholds`, or a dict of its field names to numbers) changes the rules' thresholds;
    an unknown name raises ValueError listing the valid ones. `functional=False` leaves out activations applied as
    functions (`F.relu`, `torch.tanh`, ...), recorded by default as `<enclosing module>:<function>`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inspect() takes an nn.Module, got {type(model).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    thresholds = make_thresholds(thresholds)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    monitor = Monitor(
        model,
        every=1,
        logdir=logdir,
        include=include,
        exclude=exclude,
        track_updates=optimizer is not None,
        accuracy="exact",  # a one-shot check reads every element: its cost does not recur
        strict=True,
        sinks=list(sinks),
        name=name,
        thresholds=thresholds,
        functional=functional,
    )
    try:
        with monitor:
            for i in range(steps):
                model.zero_grad(set_to_none=True)
                output = forward_pass(model, example_input)
                backward_pass(output, example_input, loss_fn, generator)
                if optimizer is not None:
                    optimizer.step()
                # After the last pass, close the step without beginning another: beginning one measures
                # every weight again for a step that never runs.
                if i + 1 < steps:
                    monitor.step()
                else:
                    monitor.end_step()
                if progress is not None:
                    progress(i + 1, steps)
    finally:
        model.train(was_training)
    report = monitor.report()
    if try_fixes and report.findings:

        def rerun(patched: nn.Module) -> Report:
            return inspect(patched, example_input, loss_fn=loss_fn, seed=seed)

        report = verify_fixes(model, report, rerun, seed=seed)
    return report
