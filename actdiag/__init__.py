"""actdiag: activation and gradient statistics diagnostics for PyTorch.

with actdiag.watch(model, every=10, logdir="runs/exp1") as monitor:
    ...training loop, calling monitor.step() once per step...
monitor.findings

report = actdiag.inspect(model, example_input)
"""

from __future__ import annotations

from actdiag._version import __version__
from actdiag.engine import inspect
from actdiag.errors import ActdiagError, TargetError
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
    "__version__",
    "inspect",
    "watch",
]
