"""The recorder: attaches to a model for one recorded step at a time and turns what it sees into a StepRecord.

Life of a recorded step (see the package docstring for the design):

    begin(step)  global module forward hooks (ForwardTracker.install: torch's, passing over other models' modules)
                 and parameter post-accumulate-grad hooks are registered; nothing is computed,
                 so the step before a recorded one costs only the registration
    forward      each selected module's forward hook computes its output's statistics on the output's device and,
                 if the output takes part in autograd, registers a tensor hook on it for the gradient; ReLU-family
                 outputs also advance per-unit silence streaks kept over the watch (tracking.py), and an input that
                 is not an earlier call's measured output gets a hook counting NaN/Inf in its gradient
    backward     tensor hooks compute the statistics of d(loss)/d(output); a parameter's hook, when its gradient is
                 ready, computes the statistics of the weight (still as the forward pass used it: the optimizer has
                 not run) and of .grad, and keeps a small sample of the weight for the update ratio
    end()        after optimizer.step(): update ratios; weights that got no gradient are measured now (the optimizer
                 skipped them, so they are unchanged); every hook is removed (kept when the next step is recorded
                 too); all vectors are concatenated per
                 device and read back with one copy; the host decodes them into a StepRecord

Between recorded steps no hook is registered at all, so an unrecorded step runs exactly as without actdiag (and
modules keep PyTorch's hook-free fast path).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from actdiag.hooks import merge as _dist
from actdiag.hooks.compiled import _EAGER
from actdiag.hooks.decode import LayerCall, as_tensor, decode_step, read_back
from actdiag.hooks.device import DeviceBatch
from actdiag.hooks.functional import ForwardTracker, FunctionalProbe, module_names
from actdiag.hooks.host import HostBatch
from actdiag.hooks.keys import Key, LayerKeys, layer_keys, param_keys
from actdiag.hooks.layout import StatsMeta
from actdiag.hooks.modules import (
    _CHANNELS_FIRST_3D,
    RARE_ACTIVE_BELOW,
    RELU_FAMILY,
    SATURATION_TOL,
    Selector,
    _is_compiled,
    bounds_of,
    first_tensor,
    select_modules,
    unwrap_model,
)
from actdiag.hooks.sampling import DEFAULT_SAMPLE_CAP, SMALL_SAMPLE
from actdiag.hooks.stats import (
    DEFAULT_BINS,
    Path,
    on_host,
    saturation_count,
    tensor_stats,
    unit_activity,
    unit_activity_rows,
    unit_dim_for,
    units_in_numpy,
)
from actdiag.hooks.tracking import DeviceUnits, UnitStreaks, input_grad_nonfinite, nonfinite_count
from actdiag.hooks.updates import LOW_PRECISION, LostUpdateCounts, UpdateRatios
from actdiag.records import StepRecord

# Names the rest of actdiag (and its tests) import from here; they live in the modules named above.
__all__ = [
    "RARE_ACTIVE_BELOW",
    "RELU_FAMILY",
    "SATURATION_TOL",
    "Recorder",
    "Selector",
    "bounds_of",
    "first_tensor",
    "select_modules",
    "unwrap_model",
]


class _GradHook:
    """The gradient hook of one layer call's output: one object (a partial is two, with its arguments' tuple, and
    a recorded step registers one per call while it runs, each counted by the collector)."""

    __slots__ = ("recorder", "key", "token")

    def __init__(self, recorder: Recorder, key: Key, token: int) -> None:
        self.recorder = recorder
        self.key = key
        self.token = token

    def __call__(self, grad: torch.Tensor) -> None:
        self.recorder._grad_hook(self.key, self.token, grad)


class Recorder:
    """Records one step at a time; `begin(step)` ... `end()` -> StepRecord. Not thread-safe (neither is autograd
    hook registration on one model)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        include: Selector | Iterable[Selector] | None = None,
        exclude: Selector | Iterable[Selector] | None = None,
        bins: int = DEFAULT_BINS,
        sample_cap: int = DEFAULT_SAMPLE_CAP,
        track_weights: bool = True,
        track_updates: bool = True,
        path: Path | None = None,
        exact: bool = True,
        on_error: Callable[[str, BaseException], None] | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        functional: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"actdiag watches torch.nn.Module instances, got {type(model).__name__}")
        if distributed is None:
            distributed = _dist.active()
        elif distributed and not _dist.active():
            raise ValueError("distributed=True needs torch.distributed initialised with more than one process")
        # Hooks go on the user's own modules: DDP and compiled wrappers call them, and their names are the ones
        # the user knows ("fc1", not "module.fc1" or "_orig_mod.fc1").
        compiled = _is_compiled(model)
        model = unwrap_model(model)
        if compiled and not hasattr(torch.compiler, "set_stance"):
            raise TypeError(
                "actdiag needs torch>=2.6 (torch.compiler.set_stance) to watch a torch.compile'd model; "
                "with this torch, watch the model without compiling it"
            )
        if distributed and track_weights and _dist.sharded_parameters(model):
            # Under FSDP a rank holds a shard of each parameter; its statistics would not be the parameter's.
            warnings.warn(
                "actdiag: parameters are sharded (FSDP); weight, weight-gradient and update statistics are not "
                "recorded. Activation and activation-gradient statistics are merged across ranks as usual.",
                UserWarning,
                stacklevel=3,
            )
            track_weights = False
        if bins < 1:
            raise ValueError(f"bins must be at least 1, got {bins}")
        if sample_cap < 1:
            raise ValueError(f"sample_cap must be at least 1, got {sample_cap}")
        self.model = model
        self.bins = bins
        self.sample_cap = sample_cap
        self.track_weights = track_weights
        self.track_updates = track_updates
        self.path = path  # None: the host path for CPU tensors, the device path for the rest (stats.Path)
        # False: large tensors' spread, zeros, histograms and update ratios from their sample (and the host path's
        # small tensors' over SMALL_SAMPLE elements)
        self.exact = exact
        self._on_error = on_error
        self.functional = functional  # record activations applied as functions (F.relu, torch.tanh, ...)
        self._tracker: ForwardTracker | None = None
        self._probe = FunctionalProbe()  # whether recorded steps run under the functional mode, over the watch
        self.targets = select_modules(model, include, exclude)
        self._target_names = {id(m): name for name, m in self.targets}  # what the global forward hook measures
        self._module_names = module_names(model)  # every module of the model: the tracker's filter
        self.params: list[tuple[str, nn.Parameter]] = list(model.named_parameters()) if track_weights else []
        self._param_map = dict(self.params)
        self._param_keys = {pname: param_keys(pname) for pname, _ in self.params}  # kept for the whole watch
        # One callable per parameter for the whole watch, registered again on each recorded step.
        self._param_hooks = {pname: partial(self._param_grad_hook, pname) for pname, _ in self.params}
        self._param_name = {id(p): n for n, p in model.named_parameters()}
        self._weight_of: dict[str, str | None] = {name: self._own_weight(m) for name, m in self.targets}
        self._handles: list[Any] = []
        self._kept = False  # hooks kept by end(keep_hooks=True) for the next begin()
        self._hooked: tuple[bool, ...] = ()  # the parameters' requires_grad when the hooks were registered
        self._recording = False
        self._token = 0
        self._step = -1
        self._pending: dict[Key, tuple[torch.Tensor | np.ndarray, Any]] = {}
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int, Key]] = {}
        self._aliases: dict[Key, Key] = {}
        # The host path's tensors, measured together in end(); estimating, small ones over SMALL_SAMPLE elements
        # from a sample of that many.
        self._host_batch = HostBatch(bins, sample_cap, None if exact else min(SMALL_SAMPLE, sample_cap))
        self._device_batch = DeviceBatch(bins, sample_cap)  # the same for the device path (CUDA's)
        self._param_together = self._device_batch.together(partial(self._guard, "weights"))
        # Small float32 CPU weights whose gradients a running backward pass has accumulated (`_params_ready`)
        self._ready: dict[str, torch.Tensor] = {}
        self._ready_task = -1  # the backward pass (graph task) that has `_params_ready` queued
        self._updates = UpdateRatios(sample_cap)  # weight copies for the update ratios
        self._lost = LostUpdateCounts(sample_cap)  # float16/bfloat16 weights: updates that rounded away
        self._calls: dict[str, int] = {}
        self._module_kind: dict[str, _ModuleKind] = {}  # per measured module name, kept across steps
        self._order: list[LayerCall] = []
        self._streaks_due: list[tuple[str, int]] = []  # ReLU layer calls whose streak summary end() reads
        self._units_due: list[_UnitsDue] = []  # ReLU layer calls whose units end() counts from the host batch
        self._ever_active: dict[tuple[str, int], torch.Tensor] = {}
        self._streaks = UnitStreaks()  # silence streaks per unit over the whole watch (dead units over a window)
        self._device_units = DeviceUnits()  # the device path's unit counts, finished together in end()
        self._input_from: dict[tuple[str, int], Key] = {}  # a call's input is this earlier call's output
        self._prev_channels_first = False
        self.failed: set[str] = set()
        self._kinds: dict[Key, str] = {}
        self._late_params: dict[str, torch.Tensor] = {}
        self._late_queued = False
        # The gradient an optimizer stepped with is the one kept (see step_grads): which .grad object and version
        # each parameter's statistics were taken from, and the parameters an optimizer has stepped this step.
        self._grad_seen: dict[str, tuple[int, int]] = {}
        self._frozen: set[str] = set()
        self._nograd_calls: dict[str, list[int]] = {}
        self._recomputed: dict[str, int] = {}
        self._stance = False
        self.merger: _dist.StepMerger | None = None
        self._grad_scale = 1.0
        if distributed:
            self._grad_scale = 1.0 / torch.distributed.get_world_size(process_group)
            self.merger = _dist.StepMerger(
                bins=bins, rare_below=RARE_ACTIVE_BELOW, group=process_group, on_mismatch=self._mismatch
            )

    @property
    def distributed(self) -> bool:
        """True when each recorded step is merged across the ranks of torch.distributed."""
        return self.merger is not None

    # ------------------------------------------------------------------ lifecycle
    @property
    def recording(self) -> bool:
        return self._recording

    def begin(self, step: int) -> None:
        """Start recording training step `step`: weight statistics now, hooks until `end()`."""
        if self._recording:
            self.abort()
        self._step = step
        self._token += 1
        self._clear_step()
        self._recording = True
        trainable = tuple(p.requires_grad for _, p in self.params)
        if self._kept and self._tracker is not None and self._hooked == trainable:
            # The hooks of the step just ended were kept for this one (see end(keep_hooks=True)).
            self._kept = False
            self._tracker.restart()
            return
        self._remove_hooks()
        self._stance = _EAGER.acquire()
        # The tracker's global module hooks call _forward_hook for the targets (ForwardTracker.install).
        self._tracker = ForwardTracker(
            self, self.model, functional=self.functional, probe=self._probe, names=self._module_names
        )
        self._handles += self._tracker.install(self._target_names)
        self._hooked = trainable
        for (pname, p), grad in zip(self.params, trainable, strict=True):
            if grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._param_hooks[pname]))

    def end(
        self, keep_hooks: bool = False, optimizers: Mapping[str, tuple[float, str]] | None = None
    ) -> StepRecord | None:
        """Finish the recorded step: remove hooks, read everything back once, decode. None if nothing ran.
        `optimizers`: {parameter name: (learning rate, optimizer class)} of the optimizer steps it saw.

        `keep_hooks`: the next step is recorded too and begins right after this one ends (every=1): the hooks stay
        registered, inert until `begin()` takes them over, instead of a few thousand handles removed and made
        again. `release_hooks()` removes them if the next step is not begun after all."""
        if not self._recording:
            return None
        self._remove_hooks(keep=keep_hooks)
        if self.merger is None and not self._order and not self._any_param_grad():
            # Nothing ran since begin() (e.g. the watch closes right after a step): measuring every weight for a
            # record that would be dropped below costs a full pass over the parameters.
            self.abort()
            return None
        with torch.no_grad():
            for pname, p in self.params:
                if not self._has(self._param_keys[pname].weight):
                    self._guard("weights", self._record_weight, pname, p, False)
            ratios = self._guard("updates", self._updates.finish, self._param_map)
            for pname, vec in (ratios or {}).items():
                self._put_new(self._param_keys[pname].update, vec, None, _dist.KIND_REPLICATED)
            lost = self._guard("updates", self._lost.finish, self._param_map)
            for pname, vec in (lost or {}).items():
                self._put_new(self._param_keys[pname].lost, vec, None, _dist.KIND_REPLICATED)
            units_due, self._units_due = self._units_due, []
            self._guard("activations", self._units_from_rows, units_due)  # before the streaks are summarised
            for key, vec in (self._guard("activations", self._device_units.finish, RARE_ACTIVE_BELOW) or {}).items():
                self._put_new(key, vec, None)
            due, self._streaks_due = self._streaks_due, []
            summaries = self._guard("activations", self._streaks.summaries, due, self.path != "device") or ()
            for (name, call), vec in zip(due, summaries, strict=False):
                self._put_new(layer_keys(name, call).streak, vec, None)
        self._updates.clear()
        self._lost.clear()
        self._recording = False
        if len(self._host_batch):
            self._pending.update(self._host_batch.finish())  # numpy rows: no read-back to make
        if len(self._device_batch):
            self._pending.update(self._device_batch.finish())
        # Keys measured as another key's tensor take its statistics after the read-back (and the merge across
        # ranks, identical for both): one vector read back, merged and decoded, one TensorStats object shared.
        aliases = {key: src for key, src in self._aliases.items() if src in self._pending}
        self._aliases = {}
        self._seen = {}
        pending, self._pending = self._pending, {}
        kinds, self._kinds = self._kinds, {}
        order, self._order = self._order, []
        self._late_params = {}
        input_from, self._input_from = self._input_from, {}
        if self.merger is not None:
            # Every rank reaches this collective for every recorded step, whatever it saw, so that the ranks stay
            # in lockstep (a rank skipping it would leave the others waiting).
            tensors = {key: (as_tensor(vec), meta) for key, (vec, meta) in pending.items()}  # the merge concatenates
            host = self.merger.merge(tensors, kinds)
        if not order and not _has_param_grad(pending):
            return None
        if self.merger is None:
            host = read_back(pending)
        return decode_step(
            host,
            order,
            aliases,
            input_from,
            step=self._step,
            named_params=self.params,
            streaks=self._streaks,
            update_sampled=self._update_sampled,
            optimizers=optimizers,
        )

    def capture_param_grads(self) -> None:
        """Re-read every parameter's current `.grad` (e.g. right before the optimizer step, after AMP unscaling
        and clipping), replacing the statistics the accumulate hooks took; no-op outside a recorded step."""
        if not self._recording:
            return
        with torch.no_grad():
            for pname, p in self.params:
                if p.requires_grad and p.grad is not None:
                    self._guard("weight gradients", self._put_stats, self._param_keys[pname].grad, p.grad)

    def abort(self) -> None:
        """Drop the step in progress and remove every hook (used on exit and after errors)."""
        self._remove_hooks()
        self._recording = False
        self._clear_step()
        self._host_batch.release()
        self._device_batch.release()
        self._updates.release()
        self._lost.clear()

    def _clear_step(self) -> None:
        """Forget everything a step collected (begin() starts from here, abort() ends here)."""
        self._pending = {}
        self._seen = {}
        self._aliases = {}
        self._host_batch.clear()
        self._device_batch.clear()
        self._updates.clear()
        self._lost.clear()
        self._kinds = {}
        self._late_params = {}
        self._late_queued = False
        self._ready = {}
        self._ready_task = -1
        self._grad_seen = {}
        self._frozen = set()
        self._nograd_calls = {}
        self._recomputed = {}
        self._input_from = {}
        self._calls = {}
        self._order = []
        self._streaks_due = []
        self._units_due = []
        self._device_units.clear()
        self._prev_channels_first = False

    def _mismatch(self, message: str) -> None:
        if self._on_error is None:
            raise RuntimeError(f"actdiag: {message}")
        self._on_error("distributed merge", RuntimeError(message))

    def release_hooks(self) -> None:
        """Remove hooks kept by `end(keep_hooks=True)` (no-op otherwise, and while a step is recorded)."""
        if self._kept and not self._recording:
            self._remove_hooks()

    def _remove_hooks(self, keep: bool = False) -> None:
        """Remove every hook; with `keep`, only close the step's forward tracking and keep them for the next."""
        tracker = self._tracker
        if tracker is not None:
            tracker.close()
            tracker.mark_outputs()
        if keep and self._handles:
            self._kept = True
            return
        self._kept = False
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self._tracker = None
        stance, self._stance = self._stance, False
        if stance:
            _EAGER.release()

    # ------------------------------------------------------------------ hooks
    def _guard(self, part: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one piece of recording; an exception disables that part instead of breaking the user's training."""
        if part in self.failed:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            if self._on_error is None:
                raise
            self.failed.add(part)
            self._on_error(part, exc)
            return None

    def _forward_hook(self, name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self._recording:
            return
        # Activation checkpointing re-runs forward inside backward to rebuild activations; that is the same
        # call again, not a new one, so it is not counted twice.
        if torch._C._current_graph_task_id() != -1:
            self._guard("gradients", self._recomputed_output, name, output)
            return
        self._guard("activations", self._record_output, name, module, output)
        self._guard("nonfinite", self._watch_input, name, inputs, output)

    def _recomputed_output(self, name: str, output: Any) -> None:
        # Reentrant checkpointing ran the first forward under no_grad, so that call got no gradient hook; its
        # recomputation inside backward is the only tensor the gradient flows through. The k-th recomputation of
        # a module is matched to its k-th no-grad call of the step (a module shared by several checkpointed
        # segments, recomputed in reverse segment order, would be matched out of order).
        calls = self._nograd_calls.get(name)
        k = self._recomputed.get(name, 0)
        if not calls or k >= len(calls):
            return
        self._recomputed[name] = k + 1
        t = first_tensor(output)
        if t is not None and t.is_floating_point() and t.requires_grad:
            t.register_hook(_GradHook(self, layer_keys(name, calls[k]).grad, self._token))

    def _record_output(self, name: str, module: nn.Module, output: Any) -> None:
        t = first_tensor(output)
        if t is None:
            return
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        kind = self._module_kind.get(name)
        if kind is None or kind.module is not module:
            kind = self._module_kind[name] = _ModuleKind.of(module, self._weight_of.get(name))
        keys = layer_keys(name, call)
        shape = tuple(t.shape)
        info = LayerCall(name, kind.type, call, shape, _dtype_name(t.dtype), kind.weight_name)
        self._order.append(info)
        self._put_stats(keys.act, t, _dist.KIND_STATS)
        floating = t.is_floating_point()
        bounds = kind.bounds
        if bounds is not None and floating and t.numel():
            lo, hi, tol = bounds
            info.bounds = (lo, hi)
            info.sat_numel = t.numel()
            self._put(keys.sat, saturation_count(t, lo, hi, tol, path=self.path), t.numel(), _dist.KIND_SUM)
        if kind.relu and floating and t.numel():
            self._record_units(name, call, keys, info, t, shape)
        self._prev_channels_first = kind.channels_first
        if floating and t.requires_grad and torch.is_grad_enabled():
            t.register_hook(_GradHook(self, keys.grad, self._token))
        elif floating and not torch.is_grad_enabled():
            self._nograd_calls.setdefault(name, []).append(call)

    def _record_units(
        self, name: str, call: int, keys: LayerKeys, info: LayerCall, t: torch.Tensor, shape: tuple[int, ...]
    ) -> None:
        """Per-unit activity of a ReLU-family output: dead/rare/never counts, silence streaks (`_record_output`)."""
        udim = unit_dim_for(shape, self._prev_channels_first)
        if udim is None:
            return
        units = shape[udim]
        ever = self._ever_active.get((name, call))
        if ever is None or ever.shape[0] != units or not (ever.is_cpu and t.is_cpu or ever.device == t.device):
            ever = torch.zeros(units, dtype=torch.bool, device=t.device)
            self._ever_active[(name, call)] = ever
        info.units = units
        if self.merger is not None:
            # Dead/rare/never are decided after the ranks' per-unit counts are summed.
            vec = _dist.unit_vector(t, udim, ever)
            self._put(keys.unitvec, vec, t.numel() // max(units, 1), _dist.KIND_UNITS)
            return
        streak = self._streaks.streak_for(name, call, units, ever.device, self._step)
        if keys.act in self._host_batch.items and ever.is_cpu:
            # The output's copy is in the host batch: its units are counted from it when the step ends, with the
            # other outputs of its shape (a few numpy calls per shape, not per call).
            self._units_due.append(_UnitsDue(keys.units, keys.act, shape, udim, ever, streak))
        elif not units_in_numpy(t, ever, self.path):
            self._device_units.take(keys.units, t, udim, ever, streak)  # finished with the others of its shape
        else:
            self._put(keys.units, unit_activity(t, udim, ever, RARE_ACTIVE_BELOW, path=self.path, streak=streak), None)
        self._streaks_due.append((name, call))  # summarised together in end()

    def _units_from_rows(self, due: list[_UnitsDue]) -> None:
        """Unit counts of the ReLU outputs whose copies the host batch holds, a batch per shape (`_record_output`)."""
        groups: dict[tuple[tuple[int, ...], int], list[_UnitsDue]] = {}
        for job in due:
            groups.setdefault((job.shape, job.unit_dim), []).append(job)
        for (shape, udim), jobs in groups.items():
            rows = self._host_batch.rows_of([job.act for job in jobs])
            if rows is None:  # a copy was dropped (the key measured again): no unit counts for these
                continue
            streaks = [job.streak for job in jobs]
            counts = unit_activity_rows(rows, shape, udim, [job.ever for job in jobs], streaks, RARE_ACTIVE_BELOW)
            for job, vec in zip(jobs, counts, strict=True):
                self._put_new(job.key, vec, None)

    def _watch_input(self, name: str, inputs: Any, output: Any) -> None:
        # Where a NaN/Inf starts (rules/run.py): the step's first input is checked for NaN/Inf (bad data), and the
        # gradient with respect to each call's input, so that the module whose backward turns a finite gradient
        # into NaN/Inf can be named. An input that is an earlier call's measured output has that call's gradient
        # measured already; only other inputs get a hook of their own.
        x, t = first_tensor(inputs), first_tensor(output)
        call = self._calls.get(name, 0) - 1
        if self.merger is not None or x is None or t is None or call < 0 or not x.is_floating_point():
            return
        if len(self._order) == 1 and self._order[0].name == name:
            self._put(layer_keys(name, call).input, nonfinite_count(x), None)
        if x is t or not x.requires_grad or not torch.is_grad_enabled():
            return
        seen = self._seen.get(id(x))
        if seen is not None and seen[0]() is x and seen[2].kind == "act" and x._version == seen[1]:
            self._input_from[(name, call)] = seen[2]
            return
        key = layer_keys(name, call).ingrad
        x.register_hook(partial(self._ingrad_hook, key, self._token))

    def _ingrad_hook(self, key: Key, token: int, grad: torch.Tensor) -> None:
        if token != self._token or not self._recording:
            return
        self._guard("nonfinite", self._put, key, input_grad_nonfinite(grad), None)

    def _grad_hook(self, key: Key, token: int, grad: torch.Tensor) -> None:
        # A hook can outlive its step (a graph kept alive and backpropagated later): ignore stale ones.
        if token != self._token or not self._recording:
            return
        measured = grad
        if self._grad_scale != 1.0:
            # DDP optimises the mean of the ranks' losses: the gradient of that objective with respect to this
            # rank's activations is the rank's own gradient divided by the world size (the same division DDP
            # applies to parameter gradients). Merged, these equal a single process's over the whole batch.
            measured = grad * self._grad_scale
        self._guard("gradients", self._put_stats, key, measured, _dist.KIND_STATS, grad)

    def _param_grad_hook(self, pname: str, p: torch.Tensor) -> None:
        # Small float32 CPU parameters are taken together at the end of backward on the host path; under DDP they
        # are read after its all-reduce instead (`_late_params_stats`).
        if (
            self.merger is None
            and self._recording
            and self.path != "device"
            and p.is_cpu
            and p.dtype == torch.float32
            and 0 < p.numel() <= self.sample_cap
        ):
            # A small float32 CPU weight: it and its gradient are copied with the others of their size when this
            # backward pass ends (`_params_ready`), a copy per size rather than per tensor.
            self._ready[pname] = p
            task = torch._C._current_graph_task_id()
            if task == self._ready_task:  # this backward pass has the callback queued already
                return
            try:
                _queue_callback(self._params_ready)
                # By task, not a flag: a backward pass that raised never runs its callback, and the next one
                # (a retry in the same step) queues its own, which takes the parameters left over too.
                self._ready_task = task
                return
            except RuntimeError:  # not inside a backward pass after all: measured now
                del self._ready[pname]
        with self._param_together:  # a large weight and its gradient: one call of the fused kernel for both
            self._param_grad(pname, p)

    def _params_ready(self) -> None:
        """At the end of a backward pass: the small float32 weights whose gradients it accumulated, and those
        gradients, copied into the host batch a size at a time (what `_param_grad` does for each)."""
        ready, self._ready = self._ready, {}
        self._ready_task = -1
        if self._recording and ready:
            self._guard("weight gradients", self._take_params, ready)

    def _take_params(self, ready: dict[str, torch.Tensor]) -> None:
        groups: dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        for pname, p in ready.items():
            g = p.grad
            if g is None or pname in self._frozen:
                continue
            if g.is_cpu and g.dtype == torch.float32 and g.layout == torch.strided and g.shape == p.shape:
                groups.setdefault(p.numel(), []).append((pname, p, g))
            else:  # a sparse gradient, say: one by one
                with self._param_together:
                    self._param_grad(pname, p)
        for items in groups.values():
            fresh = [(pname, p) for pname, p, _ in items if not self._has(self._param_keys[pname].weight)]
            if fresh and "weights" not in self.failed:
                keys = [self._param_keys[pname].weight for pname, _ in fresh]
                kept = self._host_batch.take_many(keys, [p for _, p in fresh])
                if kept is None:
                    for pname, p in fresh:
                        self._guard("weights", self._record_weight, pname, p, True)
                else:
                    self._taken(keys)
                    if self.track_updates:
                        self._updates.keep_rows([pname for pname, _ in fresh], *kept)
            keys = [self._param_keys[pname].grad for pname, _, _ in items]
            if self._host_batch.take_many(keys, [g for _, _, g in items]) is None:
                for pname, _, g in items:
                    self._put_grad(pname, g)
                continue
            self._taken(keys)
            for pname, _, g in items:
                self._grad_seen[pname] = (id(g), g._version)

    def _taken(self, keys: list[Key]) -> None:
        """Parameter keys just taken by the host batch: their statistics are its (as in `_put_stats`)."""
        pending, aliases, kinds = self._pending, self._aliases, self._kinds
        for key in keys:
            if pending:
                pending.pop(key, None)
            if aliases:
                aliases.pop(key, None)
            kinds[key] = _dist.KIND_REPLICATED

    def _param_grad(self, pname: str, p: torch.Tensor) -> None:
        # No torch.no_grad() here (entering and leaving it costs more than some hooks' work): every path detaches
        # the tensors it reads before any op, so no graph is recorded either way.
        if not self._recording or p.grad is None:
            return
        # Gradient accumulation runs this hook once per backward; the weight is measured on the first. It is still
        # the weight the forward pass used: the optimizer has not run.
        if not self._has(self._param_keys[pname].weight):
            self._guard("weights", self._record_weight, pname, p, True)
        if pname not in self._frozen:  # once stepped, the weight is no longer the one before the step
            self._snapshot_lost(pname, p)
        if self.merger is not None:
            # Under DDP this is still the rank's own gradient: the all-reduced average is written into .grad by a
            # callback DDP queues at the end of backward. Read .grad after that callback instead (see _late).
            self._late_params[pname] = p
            if not self._late_queued:
                self._late_queued = True
                self._guard("weight gradients", _queue_callback, self._late_first)
            return
        if pname not in self._frozen:  # a later backward (a GAN's other loss) did not feed the step taken
            self._guard("weight gradients", self._put_grad, pname, p.grad)

    def _put_grad(self, pname: str, grad: torch.Tensor) -> None:
        self._put_stats(self._param_keys[pname].grad, grad)
        self._grad_seen[pname] = (id(grad), grad._version)

    def step_grads(self, names: Iterable[str]) -> None:
        """An optimizer is about to step these parameters: keep their gradient as it is now (re-measured if it
        changed since it was measured: clipped, unscaled, accumulated) and ignore later backward passes of this
        step, which feed another optimizer's step (a GAN's generator loss reaching the discriminator)."""
        if not self._recording:
            return
        with torch.no_grad():
            for pname in names:
                p = self._param_map.get(pname)
                if p is None or pname in self._frozen or p.grad is None:
                    continue
                if self._grad_seen.get(pname) != (id(p.grad), p.grad._version):
                    self._guard("weight gradients", self._put_grad, pname, p.grad)
                self._snapshot_lost(pname, p)  # the weight and gradient the step is about to use
                self._frozen.add(pname)

    def _late_first(self) -> None:
        # Runs at the end of backward, but possibly before DDP's callback (queued when its last bucket was ready,
        # after our first hook). Callbacks queued while callbacks run go last, after DDP's.
        self._guard("weight gradients", _queue_callback, self._late_params_stats)

    def _late_params_stats(self) -> None:
        self._late_queued = False
        params, self._late_params = self._late_params, {}
        if not self._recording:
            return
        for pname, p in params.items():
            if p.grad is not None and pname not in self._frozen:
                self._guard("weight gradients", self._put_grad, pname, p.grad)
                self._snapshot_lost(pname, p)  # against the averaged gradient the optimizer will use

    def _record_weight(self, pname: str, p: torch.Tensor, before_update: bool) -> None:
        key = self._param_keys[pname].weight
        self._put_stats(key, p)
        if before_update and self.track_updates and p.is_floating_point():
            flat = p.detach().reshape(-1)
            # A float32 weight copied into the host batch just now is the copy the update ratio compares with.
            copy = self._host_batch.row_of(key) if p.dtype == torch.float32 else None
            self._updates.snapshot(
                pname, flat, host=on_host(flat, self.path), sampled=self._update_sampled(flat.numel()), copy=copy
            )

    def _snapshot_lost(self, pname: str, p: torch.Tensor) -> None:
        if self.track_updates and p.dtype in LOW_PRECISION:
            self._guard("updates", partial(self._lost.snapshot, sampled=self._update_sampled(p.numel())), pname, p)

    def _update_sampled(self, numel: int) -> bool:
        """Whether a weight of `numel` elements gets its update ratio from its fixed sample (an estimate)."""
        return not self.exact and numel > self.sample_cap

    # ------------------------------------------------------------------ helpers
    def _stats(self, t: torch.Tensor) -> tuple[torch.Tensor, StatsMeta]:
        return tensor_stats(t, bins=self.bins, sample_cap=self.sample_cap, path=self.path, exact=self.exact)

    def _put_stats(self, key: Key, t: torch.Tensor, kind: str = "replicated", source: Any = None) -> None:
        # `source`: the tensor `t` was computed from when it is not the one a hook received (a gradient scaled
        # under DDP); the check for a tensor already measured looks at that one.
        source = t if source is None else source
        layer = key.is_layer
        if layer and self._same_as_measured(key, source):  # an earlier key's statistics, given to this one in end()
            return
        # Measured with the step's other tensors in end() (take() keeps what it needs): CPU tensors in numpy, the
        # device path's (CUDA tensors, or all with path="device") with one set of device ops for all of them.
        batch = self._host_batch if t.is_cpu and self.path != "device" else self._device_batch  # stats.on_host
        meta = batch.take(key, t, not self.exact)
        if meta is not None:
            self._pending.pop(key, None)
            self._aliases.pop(key, None)
            self._kinds[key] = kind
            if layer:
                self._remember(key, source)
            return
        self._put(key, *self._stats(t), kind)
        if layer:
            self._remember(key, source)

    def _same_as_measured(self, key: Key, t: torch.Tensor) -> bool:
        """True (and `key` takes the earlier entry's statistics in end()) if this very tensor object was already
        measured in this step and has not been modified in place since (same version counter). Pass-through modules
        give such tensors: nn.Identity (e.g. a residual shortcut), nn.Dropout in eval mode or with p=0, a Flatten of
        something flat, and the gradient of each of them, which autograd hands to every hook on the tensor as one
        object. An in-place module (ReLU(inplace=True) after a BatchNorm) returns the same object with a new
        version, so its output is measured again."""
        seen = self._seen.get(id(t))
        if seen is None or seen[0]() is not t or t.is_inference() or t._version != seen[1] or not self._has(seen[2]):
            return False
        self._forget(key)
        self._aliases[key] = seen[2]
        return True

    def _remember(self, key: Key, t: torch.Tensor) -> None:
        # A weak reference: the check must not keep a gradient alive until the step ends. While the object lives,
        # its id is its own.
        if not t.is_inference():
            self._seen[id(t)] = (weakref.ref(t), t._version, key)

    def _any_param_grad(self) -> bool:
        return _has_param_grad((*self._pending, *self._host_batch.keys(), *self._device_batch.keys()))

    def _has(self, key: Key) -> bool:
        return key in self._pending or key in self._host_batch or key in self._device_batch or key in self._aliases

    def _put(self, key: Key, vec: torch.Tensor, meta: Any, kind: str = "replicated") -> None:
        # `kind` says how the entry merges across ranks (merge.KIND_*; the default is
        # KIND_REPLICATED, spelled out because default values are evaluated while the modules import each other).
        self._forget(key)
        self._put_new(key, vec, meta, kind)

    def _put_new(self, key: Key, vec: torch.Tensor | np.ndarray, meta: Any, kind: str = "replicated") -> None:
        """`_put` of a key only end() makes (update norms, unit counts, streaks): nothing of it to forget."""
        self._pending[key] = (vec, meta)
        self._kinds[key] = kind

    def _forget(self, key: Key) -> None:
        # A key's statistics live in one place: a vector in _pending, a small tensor in the batch, or an alias.
        self._pending.pop(key, None)
        self._host_batch.discard(key)
        self._device_batch.discard(key)
        self._aliases.pop(key, None)
        self._kinds.pop(key, None)

    def _own_weight(self, module: nn.Module) -> str | None:
        own = dict(module.named_parameters(recurse=False))
        p = own.get("weight")
        if p is None and own:
            p = next(iter(own.values()))
        return None if p is None else self._param_name.get(id(p))


class _ModuleKind(NamedTuple):
    """What `_record_output` needs to know of a measured module, worked out once per module."""

    module: nn.Module
    type: str
    weight_name: str | None
    bounds: tuple[float, float, float] | None
    relu: bool
    channels_first: bool

    @classmethod
    def of(cls, module: nn.Module, weight_name: str | None) -> _ModuleKind:
        return cls(
            module,
            type(module).__name__,
            weight_name,
            bounds_of(module),
            isinstance(module, RELU_FAMILY),
            isinstance(module, _CHANNELS_FIRST_3D),
        )


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype_name(dtype: torch.dtype) -> str:
    """ "float32" for torch.float32: what records call a dtype."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype).replace("torch.", "")
    return name


class _UnitsDue(NamedTuple):
    """A ReLU-family output whose unit counts end() takes from its copy in the host batch."""

    key: Key
    act: Key
    shape: tuple[int, ...]
    unit_dim: int
    ever: torch.Tensor
    streak: torch.Tensor


def _queue_callback(fn: Callable[[], None]) -> None:
    """Run `fn` when the running backward pass finishes (after the callbacks already queued)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def _has_param_grad(keys: Iterable[Key]) -> bool:
    """Whether any of the step's keys is a parameter's gradient (a step with neither layers nor these recorded
    nothing)."""
    return any(not k.is_layer and k.kind == "grad" for k in keys)
