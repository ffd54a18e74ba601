"""Activations applied as functions, and which layers produce the model's output: the module stack of a recorded
step's forward pass.

`ForwardTracker` is installed by the recorder for one recorded step (its hooks are removed with the recorder's).
A global forward pre-hook and forward hook (torch's, for every module of the process; other modules are passed
over) keep the stack of the model's module calls in progress and call the recorder's measurement (`install`).

* **Functional activations** (`F.relu`, `torch.tanh`, `x.sigmoid()`, `F.gelu(x)`, ... see `FUNCTIONS`) are seen by
  a `TorchFunctionMode` entered when the outermost module call of the step starts and left when it returns, so it
  is active only while a recorded step's forward pass runs: unrecorded steps never see it, and compiled regions run
  eagerly on recorded steps anyway (compiled.py). Each call is recorded through the recorder's own forward hook, as
  if an activation module of the same kind (`nn.ReLU`, `nn.Tanh`, ...) had produced the tensor, under the name
  `<enclosing module>:<function>` (`encoder.mlp:relu`; `:relu` in the root module's own forward). A function called
  inside a `torch.nn` activation module's forward (nn.ReLU calls F.relu) is that module's output, recorded once
  already. The mode hands the call on unchanged and returns its result: the values and the graph are the user's.
* **What the mode costs**: every torch call made while it is active goes through a Python `__torch_function__`.
  Two things keep that to the model's own calls, and to models that have a functional activation:
  - The mode is left while a module's forward hooks run (the recorder's, whose statistics code makes many more torch
    calls than most modules' forwards, and the user's: a function called in a hook is not the model's) and entered
    again when they are done.
  - A `FunctionalProbe`, kept by the recorder over the whole watch, decides per recorded step whether the mode is
    entered at all. The first recorded step probes (runs under the mode). A probe that records no functional
    activation makes the next recorded steps run without the mode, probing again after 1, 2, 4, ... recorded steps,
    up to `PROBE_BACKOFF_CAP`; once one is recorded the mode is entered on every recorded step for the rest of the
    watch. A model whose forward calls F.relu calls it on every step, so it is found on the first and never missed;
    a model with only activation modules pays for one probe per `PROBE_BACKOFF_CAP` + 1 recorded steps. Found, the
    mode is not given up again: the model has shown that it calls one, and the mode then costs its own calls only.
    The limit: a functional activation that only some steps reach (data-dependent control flow) is recorded on the
    probe steps that reach it and on every recorded step after the first that does, not on skipped steps before.
* **The output layer** is found from the tensors the model's forward returns: the recorded layer calls whose
  outputs they are, or, walking their autograd graph back, the nearest recorded calls their values come from (every
  call of a head applied several times, or of each head of a multi-head model), back to and including the nearest
  layer with a weight (an output sigmoid and the linear map before it). Those calls get `output=True`.
"""

from __future__ import annotations

import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from actdiag.hooks.modules import first_tensor

# A walk back through the autograd graph from the model's output stops after this many nodes: the head is a few
# nodes from the output (a squeeze, a scale, a loss), and a walk through the whole graph would cost a recorded step
# a Python call per op of the model.
MAX_GRAPH_NODES = 512

# The most recorded steps run without the mode between two probes of a model where none was found: a functional
# activation that starts being called later (a branch taken after warm-up) is missed on at most this many recorded
# steps, and a model without one pays for one probe per this many recorded steps.
PROBE_BACKOFF_CAP = 32

# The start of what torch.compile's OptimizedModule warns on each call while any global module hook is registered.
_COMPILE_WARNING = r"Using `torch.compile\(module\)` when there are global hooks"


@dataclass(frozen=True, slots=True)
class Function:
    """How a functional activation is recorded: the suffix of its record's name and the module standing in for it
    (its type, bounds and family are what the recorder and the rules read)."""

    short: str
    module: Callable[[tuple[Any, ...], Mapping[str, Any]], nn.Module]


def _fixed(module: nn.Module) -> Callable[[tuple[Any, ...], Mapping[str, Any]], nn.Module]:
    return lambda args, kwargs: module


def _hardtanh(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> nn.Module:
    # F.hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False): its bounds are the call's own.
    lo = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    hi = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return nn.Hardtanh(float(lo), float(hi))


def _table() -> dict[Any, Function]:
    t = torch.Tensor
    kinds: list[tuple[str, Callable[[tuple[Any, ...], Mapping[str, Any]], nn.Module], tuple[Any, ...]]] = [
        ("relu", _fixed(nn.ReLU()), (F.relu, F.relu_, torch.relu, torch.relu_, t.relu, t.relu_)),
        ("relu6", _fixed(nn.ReLU6()), (F.relu6,)),
        ("leaky_relu", _fixed(nn.LeakyReLU()), (F.leaky_relu, F.leaky_relu_)),
        ("elu", _fixed(nn.ELU()), (F.elu, F.elu_)),
        ("celu", _fixed(nn.CELU()), (F.celu, F.celu_)),
        ("selu", _fixed(nn.SELU()), (F.selu, F.selu_, torch.selu, torch.selu_)),
        ("gelu", _fixed(nn.GELU()), (F.gelu,)),
        ("silu", _fixed(nn.SiLU()), (F.silu,)),
        ("mish", _fixed(nn.Mish()), (F.mish,)),
        ("hardswish", _fixed(nn.Hardswish()), (F.hardswish,)),
        ("tanh", _fixed(nn.Tanh()), (F.tanh, torch.tanh, torch.tanh_, t.tanh, t.tanh_)),
        ("sigmoid", _fixed(nn.Sigmoid()), (F.sigmoid, torch.sigmoid, torch.sigmoid_, t.sigmoid, t.sigmoid_)),
        ("hardtanh", _hardtanh, (F.hardtanh, F.hardtanh_)),
        ("hardsigmoid", _fixed(nn.Hardsigmoid()), (F.hardsigmoid,)),
        ("softsign", _fixed(nn.Softsign()), (F.softsign,)),
    ]
    return {fn: Function(short, make) for short, make, fns in kinds for fn in fns}


# Every spelling of each activation: the torch.nn.functional function, the torch function, the Tensor method, and
# their in-place forms. The mode sees the outermost one called (F.relu, not the torch.relu it calls).
FUNCTIONS: Mapping[Any, Function] = _table()

# Modules whose forward is one activation function (nn.ReLU calls F.relu): their output is recorded as theirs.
_ACTIVATION_MODULES = "torch.nn.modules.activation"

# Where torch's modules pick a fused inference kernel only when no argument "has a torch function", which an active
# mode makes true of every tensor (nn.MultiheadAttention, nn.TransformerEncoderLayer's fast path): in eval mode the
# mode is left for their forward, so that they compute exactly what they compute unwatched. (In training mode the
# fast path is never taken, and the F.relu of a TransformerEncoderLayer is recorded.)
_FAST_PATH_MODULES = frozenset({"torch.nn.modules.activation", "torch.nn.modules.transformer"})


class _Call(Protocol):
    """What the tracker marks: the recorder's record of one layer call (recorder._LayerCall)."""

    name: str
    weight_name: str | None
    output: bool


class _Host(Protocol):
    """The recorder, as the tracker sees it."""

    _order: list[Any]
    _step: int  # the recorded step under way

    @property
    def recording(self) -> bool: ...

    def _forward_hook(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None: ...

    def _guard(self, part: str, fn: Callable[..., Any], *args: Any) -> Any: ...


class FunctionalProbe:
    """Whether a recorded step's forward passes run under the mode (see the module docstring). One per recorder,
    kept over the whole watch; the tracker asks it at the start of each forward pass and tells it what it found."""

    def __init__(self, cap: int = PROBE_BACKOFF_CAP) -> None:
        if cap < 1:
            raise ValueError(f"the probe's backoff cap must be at least 1 recorded step, got {cap}")
        self.cap = cap
        self.found = False  # a functional activation was recorded: every recorded step runs under the mode
        self._step: int | None = None  # the recorded step the decision below is for
        self._on = True  # whether that step's forward passes run under the mode
        self._skip = 0  # recorded steps still to run without the mode
        self._backoff = 1  # recorded steps to skip after the next probe that finds none

    def wants(self, step: int) -> bool:
        """Whether recorded step `step` runs under the mode; every forward pass of one step gets the same answer."""
        if step == self._step:
            return self._on
        if self._step is not None and self._on and not self.found:  # the last recorded step probed, found none
            self._skip = self._backoff
            self._backoff = min(2 * self._backoff, self.cap)
        self._step = step
        self._on = self.found or self._skip == 0
        if not self._on:
            self._skip -= 1
        return self._on


class _Mode(TorchFunctionMode):
    def __init__(self, tracker: ForwardTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        # This mode is off while its handler runs: nested calls go straight through. Every torch call of the
        # model's forward passes here, so the common case (not an activation) is kept to a call and a lookup.
        out = func(*args, **kwargs) if kwargs else func(*args)
        try:
            fn = FUNCTIONS.get(func)
        except TypeError:  # an unhashable callable (a user's): no activation of ours
            return out
        if fn is not None and isinstance(out, torch.Tensor):
            tracker = self.tracker
            tracker.recorder._guard("functional activations", tracker.functional, fn, args, kwargs or {}, out)
        return out


class ForwardTracker:
    """The module stack of one recorded step's forward pass (see the module docstring)."""

    def __init__(
        self,
        recorder: _Host,
        model: nn.Module,
        *,
        functional: bool,
        probe: FunctionalProbe | None = None,
        names: Mapping[int, str] | None = None,
    ) -> None:
        self.recorder = recorder
        self.model = model
        self.probe = FunctionalProbe() if probe is None else probe  # a tracker's own: every recorded step probes
        self.names = module_names(model) if names is None else names  # id(module) -> name, the model's modules
        self.mode = _Mode(self) if functional else None
        self._targets: Mapping[int, str] = {}  # id(module) -> name, the modules the recorder measures
        self._trailed: set[int] = set()  # modules whose own forward hooks run before _post (see install)
        self._entered = False
        self._paused: int | None = None  # the stack depth of the fast-path module the mode was left for
        self._held: int | None = None  # the stack length when the mode was left for a module's forward hooks
        self._stack: list[tuple[str, nn.Module, int]] = []  # name, module, records before its call
        self._producers: dict[Any, list[_Call]] = {}  # grad_fn of a recorded output -> its records
        self._tensors: dict[int, tuple[weakref.ref[torch.Tensor], int, list[_Call]]] = {}
        self._root_marks: list[_Call] = []
        self._last_marks: list[_Call] = []

    def install(self, targets: Mapping[int, str]) -> list[Any]:
        """Register the step's hooks and return their handles (the caller owns them): one global forward pre-hook
        and one global forward hook (`always_call`), which run for every module called in the process and return
        at once for a module not of this model (one dict lookup), and call the recorder's `_forward_hook` for the
        modules in `targets`.

        Global hooks instead of a hook per module: a recorded step registers two hooks, not a few per module (each
        registration is a handle, a closure and weak references that live through the step, and a deep model has
        thousands of them). Torch runs global hooks before a module's own, so the user's own hooks on a module
        (and a library's) now run after ours:
        * a forward pre-hook of the user's that changes the inputs: the forward sees the changed inputs, as before;
          the outermost module's pre-hooks run under the mode (entered by ours);
        * a forward hook of the user's that replaces a module's output: the recorder measures the module's own
          output (the one its forward returned), not the replacement; the parent module computes with the
          replacement, which is the tensor the output layer is traced through (_post runs after the user's hooks).
        The user's forward hooks still run without the mode: a module that has forward hooks of its own when the
        step's hooks are installed gets one more, `always_call`, after them, which runs `_post` (and enters the
        mode again). A forward hook registered during a recorded step (or while hooks are kept) runs under it.
        While the hooks are registered (from `begin()` to `end()`, recorded steps only), a module of another model
        called in the process takes torch's hooked call path instead of its hook-free one, and a lookup here.
        """
        self._targets = targets
        self._trailed = set()
        handles: list[Any] = [
            _CompileWarningSilenced(),
            register_module_forward_pre_hook(self._global_pre),
            register_module_forward_hook(self._global_post, always_call=True),
        ]
        for module in self.model.modules():
            name = self.names.get(id(module))
            if name is not None and module._forward_hooks:
                handles.append(module.register_forward_hook(partial(self._post, name), always_call=True))
                self._trailed.add(id(module))
        return handles

    def close(self) -> None:
        """Leave the mode if a forward pass is still under way (the step ended inside it) and forget the step."""
        if self._entered and self._paused is None and self._held is None and self.mode is not None:
            self.mode.__exit__(None, None, None)
        self._entered = False
        self._paused = None
        self._held = None
        self._stack = []
        self._forget()

    def restart(self) -> None:
        """A new recorded step begins with these hooks still registered (`Recorder.end(keep_hooks=True)`)."""
        self.close()
        self._root_marks = []
        self._last_marks = []

    def mark_outputs(self) -> None:
        """Flag the records of the output layer (the root model's calls win over a submodule called on its own)."""
        for call in self._root_marks or self._last_marks:
            call.output = True

    # ------------------------------------------------------------------ hooks
    def _global_pre(self, module: nn.Module, args: Any) -> None:
        name = self.names.get(id(module))
        if name is not None:
            self._pre(name, module, args)

    def _global_post(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.names.get(id(module))
        if name is None:
            return
        # In the order the per-module hooks ran: the mode is left, the recorder measures, _post closes the call
        # (here, or in the module's last hook when it has forward hooks of its own). Torch also calls an
        # always_call hook after the forward raised, with no output: nothing to measure then, and _post still
        # runs. If the recorder raises (strict), _post runs all the same.
        try:
            if self._entered:
                self._hooks_start(module, args, output)
            target = self._targets.get(id(module))
            if target is not None and output is not None:
                self.recorder._forward_hook(target, module, args, output)
        finally:
            if id(module) not in self._trailed:
                self._post(name, module, args, output)

    def _pre(self, name: str, module: nn.Module, args: Any) -> None:
        if (
            not self._stack
            and self.mode is not None
            and self.recorder.recording
            and self.probe.wants(self.recorder._step)
        ):
            self.mode.__enter__()
            self._entered = True
        if (
            self._entered
            and self._paused is None
            and self._held is None
            and not module.training
            and type(module).__module__ in _FAST_PATH_MODULES
            and _top_mode() is self.mode
        ):
            assert self.mode is not None
            self.mode.__exit__(None, None, None)
            self._paused = len(self._stack)
        self._stack.append((name, module, len(self.recorder._order)))

    def _hooks_start(self, module: nn.Module, args: Any, output: Any) -> None:
        # The module's forward has returned and its forward hooks start: the recorder's statistics and the user's
        # hooks run without the mode (see the module docstring); _post, the last hook, enters it again. Left only
        # when the mode is the innermost one, so that a mode the user entered in the forward is not disturbed.
        if self._entered and self._paused is None and self._held is None and _top_mode() is self.mode:
            assert self.mode is not None
            self.mode.__exit__(None, None, None)
            self._held = len(self._stack)

    def _post(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not self._stack:
            return
        left = self._held == len(self._stack)  # the mode was left for this call's forward hooks
        if left:
            self._held = None
        _, _, before = self._stack.pop()
        if self._paused == len(self._stack):  # ... or for this fast-path module's whole forward
            self._paused = None
            left = True
        try:
            order = self.recorder._order
            if len(order) > before and order[-1].name == name:  # the recorder's hook ran first, recorded this call
                self.recorder._guard("output layer", self._produced, output, order[-1])
            if not self._stack and torch._C._current_graph_task_id() == -1:  # not recomputed in backward
                marks = self.recorder._guard("output layer", self._trace, output) or []
                if module is self.model:
                    self._root_marks += marks  # a model called several times a step: each call's head
                else:
                    self._last_marks = marks
        finally:
            if not self._stack:
                self._forget()
            # The mode is entered again after this hook's own work, which does not need it; the outermost call
            # leaves it for good.
            if self._entered and self.mode is not None:
                if self._stack:
                    if left:
                        self.mode.__enter__()
                else:
                    self._entered = False
                    if not left:
                        self.mode.__exit__(None, None, None)

    def functional(self, fn: Function, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: torch.Tensor) -> None:
        """A functional activation returned `out` inside the innermost module call of the stack."""
        if not self._stack:
            return
        enclosing, module, _ = self._stack[-1]
        if type(module).__module__ == _ACTIVATION_MODULES:
            return
        self.probe.found = True
        name = f"{enclosing}:{fn.short}"
        order = self.recorder._order
        before = len(order)
        self.recorder._forward_hook(name, fn.module(args, kwargs), args, out)
        if len(order) > before:
            self.recorder._guard("output layer", self._produced, out, order[-1])

    # ------------------------------------------------------------------ the output layer
    def _produced(self, output: Any, call: _Call) -> None:
        t = first_tensor(output)
        if t is None:
            return
        if t.grad_fn is not None:
            self._producers.setdefault(t.grad_fn, []).append(call)
        if not t.is_inference():
            entry = self._tensors.get(id(t))
            if entry is not None and entry[0]() is t and entry[1] == t._version:
                entry[2].append(call)  # a pass-through module (Identity, eval Dropout): the same tensor
            else:
                self._tensors[id(t)] = (weakref.ref(t), t._version, [call])

    def _trace(self, output: Any) -> list[_Call]:
        """The records whose outputs the model's output is, or is computed from (nearest ones only)."""
        marks: list[_Call] = []
        frontier: deque[Any] = deque()
        for t in _top_tensors(output):
            entry = None if t.is_inference() else self._tensors.get(id(t))
            if entry is not None and entry[0]() is t and entry[1] == t._version:
                marks.extend(entry[2])
            elif t.grad_fn is not None:
                frontier.append(t.grad_fn)
        visited: set[Any] = set()
        while frontier and len(visited) < MAX_GRAPH_NODES:
            node = frontier.popleft()
            if node is None or node in visited:
                continue
            visited.add(node)
            calls = self._producers.get(node)
            if calls is not None:
                marks.extend(calls)
                # An output activation (a classifier's sigmoid), dropout or reshape is the end of the head: the
                # walk goes on to the weight layer that feeds it, which is the head's linear map.
                if any(c.weight_name is not None for c in calls):
                    continue
            frontier.extend(nxt for nxt, _ in node.next_functions)
        return list({id(c): c for c in marks}.values())

    def _forget(self) -> None:
        # Graph nodes are held only while the forward pass runs: the graph is the user's to free.
        self._producers = {}
        self._tensors = {}


class _CompileWarningSilenced:
    """While the step's hooks are registered, torch.compile's wrapper module is not to warn that global hooks fire
    once more for it: true, and harmless here (the wrapper is not one of the model's modules: it is passed over
    like any other). Only that warning, only while the hooks are registered; removed with them (`remove`)."""

    def __init__(self) -> None:
        warnings.filterwarnings("ignore", message=_COMPILE_WARNING, category=UserWarning)
        self.entry = warnings.filters[0]

    def remove(self) -> None:
        try:
            warnings.filters.remove(self.entry)  # type: ignore[attr-defined]  # a list, typed as a Sequence
        except ValueError:  # gone already (a catch_warnings block of the user's restored the filters)
            return
        warnings._filters_mutated()  # type: ignore[attr-defined]


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> qualified name, for every module of `model`; a shared module keeps its first name, as in
    select_modules."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    return names


def _top_mode() -> Any:
    n = torch._C._len_torch_function_stack()
    return torch._C._get_function_stack_at(n - 1) if n else None


def _top_tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors a forward returns: the value itself, or the tensors directly in its tuple, list or dict (HF's
    ModelOutput is one: its loss and logits). Nested ones are left out: a cache of keys and values or the hidden
    states of every layer are returned alongside the output, not as it."""
    if isinstance(value, torch.Tensor):
        yield value
        return
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
