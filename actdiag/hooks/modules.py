"""Which modules to watch, and what their outputs hold: selectors, activation families, wrappers looked through."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

# A bounded unit counts as saturated when its output is within SATURATION_TOL of a bound: for tanh |y| >= 0.99,
# where the local gradient 1 - y**2 is under 2% of its peak (Glorot & Bengio 2010 study exactly this regime); the
# same absolute tolerance for sigmoid (y <= 0.01 or y >= 0.99, gradient under 4% of its peak). Hard-bounded units
# (hardtanh, hardsigmoid) have zero gradient exactly at the bound, so their tolerance is 0.
SATURATION_TOL = 0.01


# A ReLU-family unit is "rarely active" when it is positive for fewer than this share of its samples
# (SageMaker Debugger's dead-ReLU rule counts units active in under 1% of samples).
RARE_ACTIVE_BELOW = 0.01


RELU_FAMILY: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)


_CHANNELS_FIRST_3D: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
)


def bounds_of(module: nn.Module) -> tuple[float, float, float] | None:
    """(low, high, tolerance) for bounded activations, None for anything else."""
    if isinstance(module, nn.ReLU6):  # a Hardtanh subclass, but its lower bound is ReLU's "off", not saturation
        return None
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val), 0.0
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return -1.0, 1.0, SATURATION_TOL
    if isinstance(module, nn.Sigmoid):
        return 0.0, 1.0, SATURATION_TOL
    if isinstance(module, nn.Hardsigmoid):
        return 0.0, 1.0, 0.0
    return None


Selector = str | type[nn.Module]


def _matches(name: str, module: nn.Module, selectors: Iterable[Selector]) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatch.fnmatchcase(name, sel):
                return True
        elif isinstance(module, sel):
            return True
    return False


def _as_selectors(value: Selector | Iterable[Selector] | None, what: str) -> tuple[Selector, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, (str, type)) else tuple(value)
    for item in items:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise TypeError(f"{what} takes name patterns (str) or nn.Module subclasses, got {item!r}")
    return items


def select_modules(
    model: nn.Module,
    include: Selector | Iterable[Selector] | None = None,
    exclude: Selector | Iterable[Selector] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The modules to watch: every leaf module and every module owning parameters directly (e.g.
    MultiheadAttention, whose out_proj is never called as a module), filtered by include/exclude selectors
    (fnmatch patterns on the qualified name, or module types). Shared modules appear once, under their first name.
    """
    inc = _as_selectors(include, "include")
    exc = _as_selectors(exclude, "exclude")
    chosen = []
    for name, module in model.named_modules():
        leaf = next(module.children(), None) is None
        owns = next(module.parameters(recurse=False), None) is not None
        if not (leaf or owns):
            continue
        if inc and not _matches(name, module, inc):
            continue
        if exc and _matches(name, module, exc):
            continue
        chosen.append((name, module))
    return chosen


def first_tensor(value: Any) -> torch.Tensor | None:
    """The primary tensor of a module's output: the value itself, or the first tensor found depth-first in
    tuples, lists, dicts (HF ModelOutput is one) and dataclass-like objects."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        items: Iterable[Any] = value
    elif isinstance(value, Mapping):
        items = value.values()
    else:
        return None
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel, DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
            assert isinstance(inner, nn.Module)
            model = inner
        else:
            return model


def _is_compiled(model: nn.Module) -> bool:
    """torch.compile(model) wraps it in an OptimizedModule; model.compile() sets _compiled_call_impl."""
    return any(
        type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )
