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
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect as pyinspect
import itertools
import os
import pickle
import random
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from actdiag.errors import TargetError
from actdiag.hooks.recorder import first_tensor
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
    run_user,
    user_location,
)

FACTORIES = ("build_model", "get_model", "create_model")
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes that wrappers add to every key: DistributedDataParallel/DataParallel ("module."), a LightningModule
# holding the network as `self.model` ("model."), torch.compile's OptimizedModule ("_orig_mod.").
CHECKPOINT_PREFIXES = ("module.", "model.", "_orig_mod.")

DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}

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
def _needs_args(obj: Any) -> list[str] | None:
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
    needed = _needs_args(obj)
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
    buildable = [n for n in classes if _needs_args(getattr(module, n)) == []]
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
        found.append(f"class {n}({', '.join(_needs_args(getattr(module, n)) or ['...'])})")
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


# --------------------------------------------------------------------------------------------------- inputs
def _vocab_size(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return int(m.num_embeddings)
    return None


def synthetic_inputs(
    model: nn.Module,
    shapes: Sequence[tuple[int, ...]],
    dtypes: Sequence[str] = (),
    value_range: tuple[float, float] | None = None,
    seed: int = 0,
) -> Inputs:
    """Random inputs for --input-shape: standard normal floats (uniform in `value_range` if given), integers
    uniform in [LOW, HIGH) from `value_range`, else in [0, vocabulary size) of the model's first nn.Embedding."""
    if len(dtypes) not in (0, 1, len(shapes)):
        raise TargetError(
            f"got {len(shapes)} --input-shape and {len(dtypes)} --input-dtype; give one dtype for all inputs "
            "or one per input"
        )
    names = list(dtypes) if len(dtypes) == len(shapes) else list(dtypes or ["float32"]) * len(shapes)
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for shape, name in zip(shapes, names):
        dtype = DTYPES[name]
        if dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=gen).bool()
        elif dtype.is_floating_point:
            t = torch.randn(shape, generator=gen)
            if value_range is not None:
                low, high = value_range
                t = torch.rand(shape, generator=gen) * (high - low) + low
            t = t.to(dtype)
        else:
            if value_range is not None:
                low, high = int(value_range[0]), int(value_range[1])
            else:
                vocab = _vocab_size(model)
                if vocab is None:
                    raise TargetError(
                        f"--input-dtype {name} needs --input-range LOW,HIGH (e.g. 0,30000 for token ids): "
                        "the model has no nn.Embedding to take the vocabulary size from"
                    )
                low, high = 0, vocab
            if not low < high:
                raise TargetError(f"--input-range {low},{high} holds no integer for --input-dtype {name}")
            t = torch.randint(low, high, shape, generator=gen).to(dtype)
        tensors.append(t)
    return tensors[0] if len(tensors) == 1 else tuple(tensors)


def example_inputs(module: ModuleType, spec: TargetSpec) -> Inputs | None:
    """What `example_input()` in the file returns (also accepted: a module-level value of that name), checked."""
    if not hasattr(module, "example_input"):
        return None
    obj = module.example_input
    label = "example_input()" if callable(obj) else "example_input"
    if callable(obj):
        needed = _needs_args(obj)
        if needed:
            raise TargetError(f"example_input() in {spec.where} must take no arguments, it needs {', '.join(needed)}")
        value = run_user(Stage("inputs", "example_input()"), obj)
    else:
        value = obj
    ok = isinstance(value, torch.Tensor)
    if isinstance(value, (tuple, list)):
        ok = len(value) > 0 and first_tensor(value) is not None
        value = tuple(value)
    elif isinstance(value, Mapping):
        ok = len(value) > 0 and all(isinstance(k, str) for k in value) and first_tensor(value) is not None
        value = dict(value)
    if not ok:
        empty = isinstance(value, (tuple, dict))
        got = f"a {type(value).__name__} with no tensor in it" if empty else describe_value(value)
        raise TargetError(
            f"{label} returned {got}; it must return a tensor, a tuple of tensors (positional inputs) "
            "or a dict of tensors (keyword inputs)"
        )
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------- checkpoints
def _read_checkpoint(path: Path) -> Any:
    if not path.exists():
        raise TargetError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise TargetError(f"checkpoint {path} is a directory, not a file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise TargetError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise TargetError(f"cannot read checkpoint {path}: {exc_text(exc)}") from exc
    try:
        # weights_only=True: tensors and plain containers only. A checkpoint is a pickle, and unpickling an
        # arbitrary object can run arbitrary code; actdiag never does that behind the user's back.
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None:
            _, _, tail = str(exc).partition("WeightsUnpickler error:")
            chunks = [c.strip() for c in tail.split("\n\n") if c.strip()]
            why = chunks[0] if chunks else exc_text(exc)
            raise TargetError(f"cannot read checkpoint {path}: it is not a PyTorch checkpoint ({why})") from exc
        raise TargetError(
            f"checkpoint {path} holds a pickled Python object ({found.group(1)}), and actdiag loads only tensors and "
            "plain containers (torch.load with weights_only=True), never arbitrary objects; save model.state_dict() "
            "instead of the whole model"
        ) from exc
    except Exception as exc:
        raise TargetError(f"cannot read checkpoint {path}: {exc_text(exc)}") from exc


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        keys = ", ".join(str(k) for k in list(obj)[:8]) or "none"
        raise TargetError(
            f"checkpoint {path} has no tensors at its top level nor under {'/'.join(CHECKPOINT_KEYS)} "
            f"(its keys: {keys})"
        )
    raise TargetError(f"checkpoint {path} holds {describe_value(obj)}, not a state dict")


def _strip_variants(keys: Sequence[str]) -> Iterator[tuple[tuple[str, ...], dict[str, str]]]:
    """(prefixes stripped, new key -> old key) for no stripping, one prefix, and two prefixes in either order."""
    seqs: list[tuple[str, ...]] = [()]
    seqs += [(p,) for p in CHECKPOINT_PREFIXES]
    seqs += [(a, b) for a in CHECKPOINT_PREFIXES for b in CHECKPOINT_PREFIXES if a != b]
    for seq in seqs:
        mapping: dict[str, str] = {}
        for key in keys:
            new = key
            for prefix in seq:
                if new.startswith(prefix):
                    new = new[len(prefix) :]
            mapping[new] = key
        yield seq, mapping


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Load a state dict into `model`; returns notes for the user (prefixes stripped, missing/unexpected keys)."""
    p = Path(path)
    state = _state_dict_of(_read_checkpoint(p), p)
    expected = set(model.state_dict())
    best_seq: tuple[str, ...] = ()
    best_map, best_hits = {k: k for k in state}, -1
    for seq, mapping in _strip_variants(list(state)):
        hits = len(expected & set(mapping))
        if hits > best_hits:
            best_seq, best_map, best_hits = seq, mapping, hits
    if best_hits == 0:
        got = ", ".join(list(state)[:3])
        want = ", ".join(list(expected)[:3]) or "no tensors"
        raise TargetError(
            f"none of the {len(state)} tensors in checkpoint {p} match the model: the checkpoint has {got}, ..., "
            f"the model expects {want}, ..."
        )
    renamed = {new: state[old] for new, old in best_map.items()}
    try:
        result = model.load_state_dict(renamed, strict=False)
    except RuntimeError as exc:
        details = [ln.strip().rstrip(".") for ln in str(exc).splitlines() if "size mismatch" in ln]
        detail = "; ".join(details[:3]) if details else exc_text(exc)
        raise TargetError(f"checkpoint {p} does not fit the model: {detail}") from exc
    notes = []
    if best_seq:
        notes.append(f"checkpoint: stripped the prefix {' then '.join(repr(s) for s in best_seq)} from its keys")
    if result.missing_keys:
        notes.append(
            f"checkpoint: {len(result.missing_keys)} of the model's tensors are not in {p} and keep their initial "
            f"values: {_few(result.missing_keys)}"
        )
    if result.unexpected_keys:
        notes.append(
            f"checkpoint: {len(result.unexpected_keys)} tensors in {p} match nothing in the model and were ignored: "
            f"{_few(result.unexpected_keys)}"
        )
    return tuple(notes)


def _few(names: Sequence[str], n: int = 5) -> str:
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


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
            found = example_inputs(module, spec)
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
        loss_fn = _with_target(module, spec, folder, loss_fn, dev)
        yield Target(
            spec=spec,
            module=module,
            model=model,
            found_as=found_as,
            inputs=_to_device(inputs, dev),
            loss_fn=loss_fn,
            device=dev,
            notes=notes,
        )


def _positional_arity(fn: Any) -> tuple[int, float]:
    """(required, accepted) positional parameters of `fn`; accepted is inf with *args, (0, inf) when unknown."""
    try:
        params = pyinspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0, float("inf")
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(1 for p in positional if p.default is p.empty)
    star = any(p.kind == p.VAR_POSITIONAL for p in params)
    return required, float("inf") if star else float(len(positional))


def _with_target(
    module: ModuleType, spec: TargetSpec, folder: Path | None, loss_fn: LossFn | None, device: torch.device
) -> LossFn | None:
    """With `example_target()` in the file, `loss_fn(output, inputs, target)` bound to what it returns (on the
    model's device), so the rest of actdiag calls a two-argument loss; without it, `loss_fn` as it is."""
    has_target = hasattr(module, "example_target")
    if loss_fn is None:
        if has_target:
            raise TargetError(
                f"{spec.where} defines example_target() but no loss_fn(output, inputs, target) to give it to"
            )
        return None
    required, accepted = _positional_arity(loss_fn)
    if not has_target:
        if required >= 3:
            raise TargetError(
                f"loss_fn in {spec.where} takes a target, but the file has no example_target(); add "
                "`def example_target(): return ...` returning the labels for example_input()"
            )
        return loss_fn
    if accepted < 3:
        raise TargetError(
            f"{spec.where} defines example_target(), but its loss_fn takes no target; write it as "
            "loss_fn(output, inputs, target)"
        )
    obj = module.example_target
    if callable(obj):
        if _needs_args(obj):
            raise TargetError(f"example_target() in {spec.where} must take no arguments")
        target = run_user(Stage("inputs", "example_target()"), obj)
    else:
        target = obj
    target = _to_device(target, device)
    user_loss = loss_fn

    def loss_with_target(output: Any, inputs: Any) -> torch.Tensor:
        return user_loss(output, inputs, target)  # type: ignore[call-arg]

    return loss_with_target


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
