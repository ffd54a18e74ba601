"""Recording a torch.compile'd model: its compiled regions run eagerly while a step is recorded."""

from __future__ import annotations

import sys
from typing import Any

import torch


class _EagerStance:
    """Run every torch.compile'd region eagerly while any recorder is recording (see `_enter_force_eager`).

    Recorders of several models can record at overlapping times, in any order (one process training several
    models, each watched), so the stance is reference-counted: the first recorder to begin enters it, the last one
    to end leaves it, and the user's own stance comes back then. Nested `set_stance` contexts restore their
    predecessor's stance, so leaving them out of order would leave `force_eager` set for good.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.ctx: Any = None

    def acquire(self) -> bool:
        """Hold the stance until `release()`; False if nothing was compiled (nothing to hold, nothing to release)."""
        if self.depth == 0:
            ctx = _enter_force_eager()
            if ctx is None:
                return False
            self.ctx = ctx
        self.depth += 1
        return True

    def release(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            ctx, self.ctx = self.ctx, None
            ctx.__exit__(None, None, None)  # back to the stance the user had


_EAGER = _EagerStance()


def _enter_force_eager() -> Any:
    """Run every torch.compile'd region eagerly until the returned context is exited (None: nothing to do).

    A recorded step runs the user's modules eagerly, with the hooks in place, so its statistics are exactly
    those of the eager model; compiled graphs never contain actdiag code, so actdiag causes no graph break and
    no recompilation, and the unrecorded steps run the compiled graphs untouched. If torch._dynamo was never
    imported, nothing was compiled: importing it here would only cost time.
    """
    if "torch._dynamo" not in sys.modules or not hasattr(torch.compiler, "set_stance"):
        return None
    message = (
        "monitor.step() ran inside a torch.compile'd function, where compiled code cannot be switched to eager; "
        "call it outside compiled functions"
    )
    if torch.compiler.is_compiling():
        raise RuntimeError(message)
    try:
        return torch.compiler.set_stance("force_eager")
    except RuntimeError as exc:  # "attempted to set_stance in a torch.compile region"
        raise RuntimeError(message) from exc
