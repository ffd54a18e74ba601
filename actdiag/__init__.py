"""actdiag: activation and gradient statistics diagnostics for PyTorch.

with actdiag.watch(model, every=10, logdir="runs/exp1") as monitor:
    ...training loop, calling monitor.step() once per step...
monitor.findings

report = actdiag.inspect(model, example_input)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from actdiag._version import __version__

if TYPE_CHECKING:
    from actdiag.errors import ActdiagError, TargetError
    from actdiag.inspection import inspect
    from actdiag.monitor import Monitor, watch
    from actdiag.records import (
        ExponentHistogram,
        Finding,
        Fix,
        Histogram,
        History,
        LayerStats,
        ParamStats,
        Report,
        StepRecord,
        TensorStats,
    )
    from actdiag.rules.thresholds import Thresholds

# Public names are resolved on first use (PEP 562) rather than at import: importing torch takes seconds, and the
# command line must answer `actdiag --help` / `--version` without it.
_LAZY = {
    "inspect": "actdiag.inspection",
    "ActdiagError": "actdiag.errors",
    "TargetError": "actdiag.errors",
    "Monitor": "actdiag.monitor",
    "watch": "actdiag.monitor",
    "ExponentHistogram": "actdiag.records",
    "Finding": "actdiag.records",
    "Fix": "actdiag.records",
    "Histogram": "actdiag.records",
    "History": "actdiag.records",
    "LayerStats": "actdiag.records",
    "ParamStats": "actdiag.records",
    "Report": "actdiag.records",
    "StepRecord": "actdiag.records",
    "TensorStats": "actdiag.records",
    "Thresholds": "actdiag.rules.thresholds",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'actdiag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ActdiagError",
    "ExponentHistogram",
    "Finding",
    "Fix",
    "Histogram",
    "History",
    "LayerStats",
    "Monitor",
    "ParamStats",
    "Report",
    "StepRecord",
    "TargetError",
    "TensorStats",
    "Thresholds",
    "__version__",
    "inspect",
    "watch",
]
