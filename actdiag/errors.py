"""Exceptions actdiag raises on purpose. Anything else escaping actdiag is a bug in actdiag."""

from __future__ import annotations


class ActdiagError(Exception):
    """Base class for errors actdiag raises deliberately."""


class TargetError(ActdiagError):
    """The user's target (file, model, inputs, loss) could not be loaded or run.

    The message is one sentence naming the cause, e.g. "build_model() raised RuntimeError: weights file not found".
    When the user's own code raised (see `actdiag.usercode.run_user`), `stage` names the part that ran ("import",
    "build", "forward", "loss", "backward", ...) and `cause` is what it raised; both are None for a target that
    could not be used at all (a missing file, no model in it, a bad input option).
    """

    def __init__(self, message: str, *, stage: str | None = None, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.cause = cause


class ReportPathError(ActdiagError, ValueError):
    """A report or log path cannot be written."""


class ReportReadError(ActdiagError, ValueError):
    """A saved report cannot be read back: unreadable, not JSON, not an actdiag report, or another schema version."""
