"""TARGET -> (model, inputs, loss_fn): load the user's file the way `python model.py` sees it, then run it.

Every call into the user's code (import, build, example_input(), and through `actdiag.inspect` the forward and
backward passes) goes through `actdiag.usercode.run_user`, so that each failure becomes a `TargetError` whose message
is one sentence naming the cause, which the command line prints without a traceback. Anything else that escapes is
a bug in actdiag.

A file TARGET is executed like `python path/model.py`: its folder goes first on `sys.path` (sibling imports work),
`sys.argv` is `[path]`, and it is registered in `sys.modules` under a unique name before it runs (dataclasses with
`from __future__ import annotations` look their module up there) -- but that name is not `"__main__"`, so the
file's `if __name__ == "__main__":` block does not run. Everything is restored when the run ends, and the modules
the file imported from its own folder are forgotten, so loading another file with a sibling of the same name works.

The model's inputs come from `actdiag.inputs`, a --checkpoint is read by `actdiag.checkpoint`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect as pyinspect
import itertools
import os
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from actdiag.checkpoint import load_checkpoint
from actdiag.errors import TargetError
from actdiag.inputs import example_inputs, synthetic_inputs, to_device, with_target
from actdiag.inspection import Inputs, LossFn, inspect
from actdiag.records import Report
from actdiag.usercode import (
    Stage,
    at_user,
    describe_inputs,
    describe_value,
    display_path,
    exc_text,
    exit_text,
    needs_args,
    run_user,
    user_location,
)

FACTORIES = ("build_model", "get_model", "create_model")

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_IDENT}(\.{_IDENT})*")
_counter = itertools.count()


# --------------------------------------------------------------------------------------------------- TARGET
@dataclass(frozen=True)
class TargetSpec:
    """A parsed TARGET: a file (`path`) or an importable module (`module`), and an optional `attr` (NAME)."""

    text: str
    path: Path | None = None
    module: str | None = None
    attr: str | None = None

    @property
    def where(self) -> str:
        """The file or module as the user wrote it, for messages."""
        return str(self.path) if self.path is not None else str(self.module)

    def with_attr(self, name: str) -> str:
        return f"{self.where}:{name}"


def parse_target(text: str) -> TargetSpec:
    """`path/model.py`, `path/model.py:NAME` or `package.module:NAME` (also `package.module`)."""
    text = text.strip()
    if not text:
        raise TargetError("TARGET is empty; give a Python file such as model.py, model.py:NAME or package.module:NAME")
    base, attr = text, None
    head, sep, tail = text.rpartition(":")
    # "C:\models\net.py" has a colon too; NAME must be a (dotted) identifier, which a Windows path tail never is.
    if sep and head and _DOTTED.fullmatch(tail):
        base, attr = head, tail
    p = Path(base)
    looks_like_file = base.endswith(".py") or "/" in base or os.sep in base or p.is_file()
    is_plain_dir = p.is_dir() and not (p / "__init__.py").is_file()
    if looks_like_file or is_plain_dir or not _DOTTED.fullmatch(base):
        return TargetSpec(text=text, path=p, attr=attr)
    return TargetSpec(text=text, module=base, attr=attr)


def _check_file(path: Path) -> None:
    if path.is_dir():
        scripts = sorted(f.name for f in path.glob("*.py"))[:5]
        hint = f" such as {path / scripts[0]}" if scripts else ""
        raise TargetError(f"{path} is a directory, not a Python file; give the file that defines the model{hint}")
    if not path.exists():
        raise TargetError(f"{path} does not exist")
    if path.suffix in {".pt", ".pth", ".ckpt", ".bin", ".safetensors"}:
        raise TargetError(
            f"{path} looks like a checkpoint, not a Python file; give the .py file that builds the model "
            f"and pass the weights with --checkpoint {path}"
        )
    if path.suffix != ".py":
        raise TargetError(f"{path} is not a Python file (.py)")


# --------------------------------------------------------------------------------------------------- import
class _UserCode:
    """sys.path / sys.argv / sys.modules as `python model.py` would have them, restored on exit."""

    def __init__(self, folder: Path | None, argv0: str) -> None:
        self.folder = folder
        self.argv0 = argv0
        self.names: list[str] = []

    def __enter__(self) -> _UserCode:
        # Keep the list objects as well as their contents: the user's code may replace them, not only edit them.
        self._path_obj, self._path = sys.path, list(sys.path)
        self._argv_obj, self._argv = sys.argv, list(sys.argv)
        self._modules = set(sys.modules)
        sys.path.insert(0, str(self.folder) if self.folder is not None else os.getcwd())
        sys.argv = [self.argv0]
        return self

    def __exit__(self, *exc: object) -> None:
        sys.path, sys.argv = self._path_obj, self._argv_obj
        sys.path[:] = self._path
        sys.argv[:] = self._argv
        for name in self.names:
            sys.modules.pop(name, None)
        if self.folder is None:
            return
        # Forget the modules the file imported from its own folder (its siblings), and only those: a module whose
        # top-level package was already loaded, or lives elsewhere (site-packages, actdiag), stays.
        for name in set(sys.modules) - self._modules:
            top = name.partition(".")[0]
            if top in self._modules:
                continue
            origin = getattr(sys.modules.get(top), "__file__", None)
            if origin is None:
                continue
            o = Path(origin).resolve()
            if o.parent == self.folder or (o.name == "__init__.py" and o.parent.parent == self.folder):
                sys.modules.pop(name, None)


def _module_name(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem)
    return f"_actdiag_target_{stem}_{next(_counter)}"


def _import_file(path: Path, env: _UserCode) -> ModuleType:
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"{path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    env.names.append(name)
    run_user(_import_stage(str(path)), spec.loader.exec_module, module)
    return module


def _import_module(dotted: str) -> ModuleType:
    return run_user(_import_stage(dotted, module_target=dotted), importlib.import_module, dotted)


def _import_stage(what: str, module_target: str | None = None) -> Stage:
    """Importing the target: syntax errors, missing modules and a `sys.exit` at import time each get their own
    sentence (and a hint); anything else is "importing model.py raised ..."."""

    def explain(exc: BaseException) -> str | None:
        if isinstance(exc, SyntaxError):
            where = display_path(exc.filename) if exc.filename else what
            line = f" line {exc.lineno}" if exc.lineno else ""
            code = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
            return f"syntax error in {where}{line}: {exc.msg}{code}"
        if isinstance(exc, ModuleNotFoundError):
            missing = exc.name or str(exc)
            if module_target is not None and (module_target == missing or module_target.startswith(missing + ".")):
                return (
                    f"no module named {missing!r}: {module_target!r} was read as package.module[:NAME]; "
                    "to load a file, give its path ending in .py"
                )
            loc = user_location(exc) or what
            return (
                f"importing {what} failed: {loc} imports {missing!r}, which is not installed in this Python "
                "environment (nor a file next to the target)"
            )
        if isinstance(exc, ImportError):
            return f"importing {what} failed{at_user(exc)}: {exc_text(exc)}"
        if isinstance(exc, SystemExit):
            return (
                f"{what} called {exit_text(exc)} while being imported{at_user(exc)}; "
                'move that code under `if __name__ == "__main__":`'
            )
        return None

    return Stage("import", f"importing {what}", explain=explain)


# --------------------------------------------------------------------------------------------------- discovery
def _is_module_class(v: Any) -> bool:
    return isinstance(v, type) and issubclass(v, nn.Module) and not issubclass(v, _Loss)


def _is_model_instance(v: Any) -> bool:
    # A module-level `criterion = nn.CrossEntropyLoss()` is an nn.Module too, but never the model to inspect.
    return isinstance(v, nn.Module) and not isinstance(v, _Loss)


def _materialize(obj: Any, label: str, spec: TargetSpec) -> nn.Module:
    """An nn.Module from an instance, a class (instantiated without arguments) or a factory (called)."""
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise TargetError(f"{label} is a {type(obj).__name__}, not an nn.Module, an nn.Module class or a function")
    call = f"{label}()"
    needed = needs_args(obj)
    if needed:
        if label in FACTORIES:
            hint = f"give them default values, or choose another model with {spec.with_attr('NAME')}"
        else:
            hint = f"add a build_model() function to {spec.where} that returns the model built as you want it"
        raise TargetError(f"{call} needs arguments ({', '.join(needed)}); {hint}")
    model = run_user(Stage("build", call), obj)
    if not isinstance(model, nn.Module):
        raise TargetError(f"{call} returned {describe_value(model)}, not a torch.nn.Module")
    return model


def _resolve_attr(module: ModuleType, attr: str, spec: TargetSpec) -> Any:
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [
                n for n in _public(module) if callable(getattr(module, n)) or isinstance(getattr(module, n), nn.Module)
            ]
            have = f"; it defines {', '.join(names[:10])}" if names else ""
            raise TargetError(f"{spec.where} has no {attr!r}{have}")
        obj = getattr(obj, part)
    return obj


def _public(module: ModuleType) -> list[str]:
    return [n for n in vars(module) if not n.startswith("_")]


def _defined_here(module: ModuleType, value: Any) -> bool:
    return getattr(value, "__module__", None) == module.__name__


def discover_model(module: ModuleType, spec: TargetSpec) -> tuple[nn.Module, str]:
    """The model, and how it was found ("build_model()", "model", "Net()", ...). Order: `spec.attr`; a factory
    build_model/get_model/create_model; a module-level nn.Module named `model`; the only nn.Module instance, else
    the only nn.Module subclass constructible without arguments, defined in the file."""
    if spec.attr is not None:
        obj = _resolve_attr(module, spec.attr, spec)
        model = _materialize(obj, spec.attr, spec)
        return model, spec.attr if isinstance(obj, nn.Module) else f"{spec.attr}()"
    for factory in FACTORIES:
        fn = getattr(module, factory, None)
        if callable(fn):
            return _materialize(fn, factory, spec), f"{factory}()"
    candidate = getattr(module, "model", None)
    if isinstance(candidate, nn.Module):
        return candidate, "model"
    names = _public(module)
    instances = [n for n in names if _is_model_instance(getattr(module, n))]
    classes = [
        n
        for n in names
        if _is_module_class(getattr(module, n))
        and _defined_here(module, getattr(module, n))
        and not pyinspect.isabstract(getattr(module, n))
    ]
    buildable = [n for n in classes if needs_args(getattr(module, n)) == []]
    for group, kind in ((instances, "instances"), (buildable, "classes")):
        if len(group) == 1:
            obj = getattr(module, group[0])
            return _materialize(obj, group[0], spec), group[0] if kind == "instances" else f"{group[0]}()"
        if len(group) > 1:
            listed = ", ".join(group)
            raise TargetError(
                f"{spec.where} defines several models ({kind}: {listed}); choose one with "
                f"{spec.with_attr(group[-1])} or add a build_model() function"
            )
    found = []
    for n in classes:
        found.append(f"class {n}({', '.join(needs_args(getattr(module, n)) or ['...'])})")
    for n in names:
        v = getattr(module, n)
        if pyinspect.isfunction(v) and _defined_here(module, v):
            found.append(f"function {n}()")
    what = f"it defines {', '.join(found[:8])}" if found else "it defines no functions or nn.Module classes"
    raise TargetError(
        f"no model found in {spec.where}: there is no build_model()/get_model()/create_model(), no nn.Module named "
        f"`model`, and no nn.Module class that can be built without arguments ({what}); add build_model() or name "
        f"one with {spec.with_attr('NAME')}"
    )


# --------------------------------------------------------------------------------------------------- checkpoints


# --------------------------------------------------------------------------------------------------- device
def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. Asking for cuda without it is a TargetError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TargetError(
            f"--device {name} was asked for, but CUDA is not available to this PyTorch ({torch.__version__})"
        )
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}") from exc


# --------------------------------------------------------------------------------------------------- target
@dataclass(frozen=True)
class Target:
    """A loaded target: the model on its device, its inputs, the optional loss, and notes for the user."""

    spec: TargetSpec
    module: ModuleType
    model: nn.Module
    found_as: str
    inputs: Inputs
    loss_fn: LossFn | None
    device: torch.device
    notes: tuple[str, ...] = ()


def _seed_everything(seed: int) -> None:
    # Module-level code and build_model() initialise weights from the global generators: seed them all, so that
    # the same --seed gives the same model.
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


@contextlib.contextmanager
def open_target(
    target: str,
    *,
    input_shapes: Sequence[tuple[int, ...]] = (),
    input_dtypes: Sequence[str] = (),
    input_range: tuple[float, float] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    seed: int = 0,
) -> Iterator[Target]:
    """Load TARGET inside the environment `python model.py` would give it; the environment lasts while the
    `with` block runs (the model's forward may import lazily), and is restored afterwards."""
    spec = parse_target(target)
    if spec.path is not None:
        _check_file(spec.path)
    dev = resolve_device(device)
    folder = spec.path.resolve().parent if spec.path is not None else None
    with _UserCode(folder, str(spec.path) if spec.path is not None else target) as env:
        _seed_everything(seed)
        module = _import_file(spec.path.resolve(), env) if spec.path is not None else _import_module(str(spec.module))
        model, found_as = discover_model(module, spec)
        notes: tuple[str, ...] = ()
        if checkpoint is not None:
            notes = load_checkpoint(model, checkpoint)
        run_user(Stage("move", f"moving the model to {dev}"), model.to, dev)
        if input_shapes:
            inputs = synthetic_inputs(model, input_shapes, input_dtypes, input_range, seed)
        else:
            found = example_inputs(module, spec.where)
            if found is None:
                raise TargetError(
                    f"no input for the model: {spec.where} has no example_input() function and no --input-shape "
                    "was given; add `def example_input(): return torch.randn(16, 3, 32, 32)` to the file or pass "
                    "--input-shape 16,3,32,32"
                )
            inputs = found
        loss_fn = getattr(module, "loss_fn", None)
        if loss_fn is not None and not callable(loss_fn):
            raise TargetError(f"loss_fn in {spec.where} is {describe_value(loss_fn)}, not a function")
        loss_fn = with_target(module, spec.where, loss_fn, dev)
        yield Target(
            spec=spec,
            module=module,
            model=model,
            found_as=found_as,
            inputs=to_device(inputs, dev),
            loss_fn=loss_fn,
            device=dev,
            notes=notes,
        )


# --------------------------------------------------------------------------------------------------- running
def make_optimizer(model: nn.Module, name: str, lr: float | None) -> torch.optim.Optimizer | None:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "none" or not params:
        return None
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01 if lr is None else lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3 if lr is None else lr)
    raise ValueError(f"unknown optimizer {name!r}; use none, sgd or adam")


def run_inspect(target: Target, **kwargs: Any) -> Report:
    """`actdiag.inspect` on a loaded target (options in kwargs); the user's code raising is a TargetError."""
    return inspect(target.model, target.inputs, loss_fn=target.loss_fn, **kwargs)


__all__ = [
    "Target",
    "TargetSpec",
    "describe_inputs",
    "discover_model",
    "load_checkpoint",
    "make_optimizer",
    "open_target",
    "parse_target",
    "resolve_device",
    "run_inspect",
    "synthetic_inputs",
]
