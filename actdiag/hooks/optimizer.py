"""Which optimizer steps the watched parameters, and at which learning rate.

The update rules judge a step against the learning rate in force (a schedule that decays the rate to zero is not a
stall) and give advice that fits the optimizer in use (AdaGrad's running sum, not Adam's moving average). Both are
read from the optimizer itself at the moment it steps: torch calls a global step hook for every optimizer
(`torch.optim.optimizer.register_optimizer_step_post_hook`), so the user's loop, a Trainer or Lightning need not
hand it over. `watch(..., optimizer=opt)` names it explicitly (and only its steps are read then). Just before an
optimizer steps, the recorder keeps the gradient of its parameters as the step sees it (`Recorder.step_grads`).

Only recorded steps read anything: between them the hook is one attribute test. The learning rate is taken after
`optimizer.step()` and before any `scheduler.step()` that follows it, so it is the rate this step used.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook


class OptimizerWatch:
    """Learning rate and optimizer class per parameter name, for the recorded step in progress."""

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None,
        before_step: Callable[[list[str]], None] | None = None,
    ):
        self._before = before_step
        self._names = {id(p): name for name, p in model.named_parameters()}
        if optimizers is None:
            self._only: weakref.WeakSet[Any] | None = None
        else:
            opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
            for opt in opts:
                if not isinstance(opt, torch.optim.Optimizer):
                    raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(opt).__name__}")
            self._only = weakref.WeakSet(opts)
        self._handles: list[Any] = []
        self.recording = False
        self._seen: dict[str, tuple[float, str]] = {}

    def start(self) -> None:
        if not self._handles:
            self._handles = [
                register_optimizer_step_pre_hook(self._before_step),
                register_optimizer_step_post_hook(self._after_step),
            ]

    def stop(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def begin(self) -> None:
        """A recorded step begins: forget the previous one's optimizer steps."""
        self._seen = {}
        self.recording = True

    def end(self) -> Mapping[str, tuple[float, str]]:
        """The recorded step ends: {parameter name: (learning rate, optimizer class)} of the steps it saw."""
        self.recording = False
        seen, self._seen = self._seen, {}
        return seen

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.recording or self._before is None or (self._only is not None and optimizer not in self._only):
            return
        params = (p for group in optimizer.param_groups for p in group["params"])
        self._before([self._names[id(p)] for p in params if id(p) in self._names])

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self.recording or (self._only is not None and optimizer not in self._only):
            return
        kind = type(optimizer).__name__
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):  # a tensor learning rate (capturable optimizers)
                lr = float(lr.detach().cpu()) if lr.numel() == 1 else None
            if not isinstance(lr, (int, float)):
                continue
            for p in group["params"]:
                name = self._names.get(id(p))
                if name is not None:
                    self._seen[name] = (float(lr), kind)
