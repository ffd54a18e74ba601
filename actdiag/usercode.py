"""The one place that calls the user's code: importing their file, building the model, example_input(), the
forward pass, loss_fn() and the backward pass all go through `run_user`.

Whatever that code raises (or a `sys.exit` it calls) becomes one `TargetError(message, stage, cause)` whose message
is one sentence naming the stage and the cause, and, when the traceback reaches a file of the user's, where
("build_model() raised RuntimeError: weights file not found (at model.py line 12)"). In the forward pass it also
names the layer that was running and what it was given. While the model runs, actdiag's own hooks run inside the
user's code: an exception raised from actdiag's frames is a bug of actdiag, reported as such, not blamed on the model.
"""

from __future__ import annotations

import inspect as pyinspect
import os
import sysconfig
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from actdiag.errors import TargetError

T = TypeVar("T")

_ACTDIAG_DIR = Path(__file__).resolve().parent
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


@dataclass(frozen=True, slots=True)
class Stage:
    """A part of the user's code, as messages name it.

    `subject` says who raised ("build_model()" -> "build_model() raised ValueError: ..."). `running`: the stage
    runs the model under actdiag's hooks (forward, loss, backward). `explain` may word an exception its own way
    (the import stage: syntax errors, missing modules); it returns None to leave the usual sentence.
    """

    name: str
    subject: str
    running: bool = False
    explain: Callable[[BaseException], str | None] | None = None


FORWARD = Stage("forward", "the model's forward pass", running=True)
LOSS = Stage("loss", "loss_fn()", running=True)
BACKWARD = Stage("backward", "the backward pass", running=True)


def run_user(stage: Stage, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, where `fn` is the user's code; what it raises becomes a TargetError naming `stage`.

    `fn` is called directly (not through a wrapper of actdiag's), so that any frame of actdiag in the traceback
    below this one is actdiag's own code running inside the user's. When `fn` is the model, the layers it enters
    are followed so that a failure names the layer.
    """
    trail = _Trail(fn) if isinstance(fn, nn.Module) else None
    try:
        if trail is None:
            return fn(*args, **kwargs)
        with trail:
            return fn(*args, **kwargs)
    except (TargetError, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as exc:
        if stage.running and _raised_in_actdiag(exc):
            raise RuntimeError(f"actdiag failed while recording the run: {exc_text(exc)}") from exc
        layer = trail.where() if trail is not None else None
        raise TargetError(_message(stage, exc, layer), stage=stage.name, cause=exc) from exc


def _message(stage: Stage, exc: BaseException, layer: str | None) -> str:
    explained = stage.explain(exc) if stage.explain is not None else None
    if explained is not None:
        return explained
    at = at_user(exc)
    if isinstance(exc, SystemExit):
        if stage.running:
            return f"the model's code called {exit_text(exc)} while running{at}"
        return f"{stage.subject} called {exit_text(exc)}{at}"
    if layer is not None:
        return f"the forward pass failed in {layer}: {exc_text(exc)}{at}"
    return f"{stage.subject} raised {exc_text(exc)}{at}"


# ------------------------------------------------------------------------------------------------------ words
def exc_text(exc: BaseException) -> str:
    """'ValueError: the first line of its message', or the bare type name when the message is empty."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def exit_text(exc: SystemExit) -> str:
    code = exc.code
    return "sys.exit()" if code is None else f"sys.exit({code!r})"


def describe_value(value: Any) -> str:
    """'None', 'a tensor of shape (4, 10)', 'a dict', 'a mypackage.Output'."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__module__}.{type(value).__qualname__}".replace("a builtins.", "a ")


def describe_inputs(value: Any) -> str:
    """'a tensor of shape (4, 10) float32', '2 inputs: (4, 10) float32, (4,) int64', 'inputs x=(4, 10) float32'."""

    def one(t: Any) -> str:
        if isinstance(t, torch.Tensor):
            return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
        return type(t).__name__

    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {one(value)}"
    if isinstance(value, (tuple, list)):
        return f"{len(value)} positional inputs: " + ", ".join(one(v) for v in value)
    if isinstance(value, Mapping):
        return "keyword inputs " + ", ".join(f"{k}={one(v)}" for k, v in value.items())
    return type(value).__name__


def needs_args(obj: Any) -> list[str] | None:
    """The required parameters of calling `obj()` with no arguments ([] when none), None when unknown."""
    try:
        sig = pyinspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [
        p.name
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


# ------------------------------------------------------------------------------------------------------ where
def display_path(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return filename if rel.startswith("..") else rel


def _is_user_file(filename: str) -> bool:
    """A real file outside actdiag, the standard library and installed packages."""
    if not filename or filename.startswith("<"):
        return False
    f = Path(filename).resolve()
    if _ACTDIAG_DIR in f.parents or "site-packages" in f.parts or "dist-packages" in f.parts:
        return False
    return _STDLIB not in f.parents


def user_location(exc: BaseException) -> str:
    """'model.py line 12' for the innermost frame of the traceback that is in the user's code, or ''."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if _is_user_file(frame.filename):
            return f"{display_path(frame.filename)} line {frame.lineno}"
    return ""


def at_user(exc: BaseException) -> str:
    """' (at model.py line 12)', or '' when no frame is the user's."""
    loc = user_location(exc)
    return f" (at {loc})" if loc else ""


def _raised_in_actdiag(exc: BaseException) -> bool:
    """Whether a frame below `run_user`'s own (the first) is actdiag's: a hook of ours failed inside the model."""
    frames = traceback.extract_tb(exc.__traceback__)[1:]
    # The functional-activation mode (hooks/functional.py) hands every op of the forward on: an op failing there
    # failed on the user's own values, one frame down in torch.
    frames = [f for f in frames if f.name != "__torch_function__"]
    return any(_ACTDIAG_DIR in Path(frame.filename).resolve().parents for frame in frames)


class _Trail:
    """Which modules are inside their forward() right now. When the forward pass raises, the modules that entered
    and never left are the trail to the failure; the innermost one is the layer to name.

    Global module hooks (not per-module ones) so that nothing is attached to the user's model: copies of it made
    by --try-fixes do not inherit them, and modules outside `model` are ignored.
    """

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[tuple[str, nn.Module, tuple[Any, ...]]] = []
        self.last_done: str | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> _Trail:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [
            register_module_forward_pre_hook(self._pre),
            register_module_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        name = self.names.get(id(module))
        if name is not None:
            if name == "":
                self.stack.clear()
            self.stack.append((name, module, args))

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][1] is module:
                del self.stack[i:]
                break
        self.last_done = name

    def where(self) -> str | None:
        """'layer 'fc2' (Linear(in_features=20, out_features=5, bias=True)), which got (4, 10) float32', or None."""
        if not self.stack:
            return None
        name, module, args = self.stack[-1]
        label = "the model's own forward()" if name == "" else f"layer {name!r}"
        if next(module.children(), None) is not None:
            # A container's own code raised between its children: say which child ran last.
            after = f", after layer {self.last_done!r} had run" if self.last_done else ""
            return f"{label} ({type(module).__name__}){after}"
        if not args:  # called with keyword arguments only, which module-wide pre-hooks do not see
            return f"{label} ({module!r})"
        got = describe_inputs(args[0]) if len(args) == 1 else describe_inputs(args)
        return f"{label} ({module!r}), which got {got.replace('a tensor of shape ', '')}"
