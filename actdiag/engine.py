"""`actdiag.inspect`: a one-shot check of a model on example inputs; the command line's engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from actdiag.errors import TargetError
from actdiag.hooks.recorder import Selector, first_tensor
from actdiag.monitor import Monitor, Sink
from actdiag.records import Report
from actdiag.rules.thresholds import Thresholds, make_thresholds

Inputs = torch.Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]
LossFn = Callable[[Any, Any], torch.Tensor]


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """A tensor is one positional input, a tuple/list several, a dict keyword inputs."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


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


def backward_pass(output: Any, inputs: Inputs, loss_fn: LossFn | None, generator: torch.Generator) -> None:
    """Backward from `loss_fn(output, inputs)`, or, without one, from a random unit-variance gradient at every
    output tensor: gradient statistics then measure how the network itself propagates signal."""
    if loss_fn is not None:
        try:
            loss = loss_fn(output, inputs)
        except Exception as exc:
            raise TargetError(f"loss_fn() raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TargetError(f"loss_fn() must return a scalar tensor, got {_describe(loss)}")
        if not loss.requires_grad:
            raise TargetError("loss_fn() returned a tensor that does not require grad (no parameter reaches it)")
        tensors, grads = [loss], [torch.ones_like(loss)]
    else:
        tensors = output_tensors(output)
        if not tensors:
            return
        grads = [
            torch.randn(t.shape, generator=generator, dtype=torch.float32).to(device=t.device, dtype=t.dtype)
            for t in tensors
        ]
    try:
        torch.autograd.backward(tensors, grads)
    except Exception as exc:
        raise TargetError(f"the backward pass raised {type(exc).__name__}: {exc}") from exc


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


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
) -> Report:
    """Run `steps` forward/backward passes of `model` in training mode on `example_input`, recording every step,
    and return the Report with its findings. With `optimizer`, it steps after each backward pass (on the loss, or
    on the synthetic gradient). With `try_fixes`, each suggested fix is applied to a copy of the model and checked.
    The model's training mode is restored afterwards; its gradients are left as the last pass made them.
    `thresholds` (an `actdiag.Thresholds`, or a dict of its field names to numbers) changes the rules' thresholds;
    an unknown name raises ValueError listing the valid ones.
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
        exact=True,  # a one-shot check reads every element: its cost does not recur
        strict=True,
        sinks=list(sinks),
        name=name,
        thresholds=thresholds,
    )
    try:
        with monitor:
            for i in range(steps):
                model.zero_grad(set_to_none=True)
                try:
                    output = call_model(model, example_input)
                except TargetError:
                    raise
                except Exception as exc:
                    raise TargetError(f"the model's forward pass raised {type(exc).__name__}: {exc}") from exc
                if first_tensor(output) is None:
                    raise TargetError(f"the model returned {_describe(output)}, not a tensor")
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
        from actdiag.fixes import verify_fixes

        report = verify_fixes(model, example_input, report, loss_fn=loss_fn, seed=seed)
    return report
