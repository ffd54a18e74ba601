"""`actdiag.watch`: wrap a training loop, record every N-th step, keep a bounded history, feed the sinks."""

from __future__ import annotations

import atexit
import gc
import os
import signal
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from actdiag import rules
from actdiag._version import __version__
from actdiag.errors import ReportPathError
from actdiag.fixes import attach_fixes
from actdiag.history import DEFAULT_MAX_HISTORY, HistoryBuffer
from actdiag.hooks import merge as _dist
from actdiag.hooks.optimizer import OptimizerWatch
from actdiag.hooks.recorder import Recorder, Selector, unwrap_model
from actdiag.hooks.stats import DEFAULT_BINS, DEFAULT_SAMPLE_CAP
from actdiag.metrics import any_nonfinite
from actdiag.records import (
    Finding,
    History,
    ModelInfo,
    Report,
    RunInfo,
    StepRecord,
)
from actdiag.rules.run import nonfinite_event
from actdiag.rules.thresholds import Thresholds, make_thresholds

# Record every 50th step by default: unrecorded steps run no hook, so a recorded step's extra time is spread over
# the interval, and at 50 the average stays well within the 1.03x budget of a tool meant to stay on (measured in
# BENCHMARKS.md); it is also Lightning's default logging interval. Step 0 is always recorded, so even short runs get
# the state at initialisation.
DEFAULT_EVERY = 50


class Sink(Protocol):
    """Receives each recorded step as it completes, and the final report when the watch closes."""

    def on_record(self, record: StepRecord) -> None: ...

    def on_close(self, report: Report) -> None: ...


def check_writable_dir(path: str | os.PathLike[str], what: str) -> Path:
    """Create `path` if needed and prove it is writable now, so a bad path fails at start, not hours later.

    Raises ReportPathError (a ValueError) naming the path.
    """
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".actdiag-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ReportPathError(f"{what} {str(p)!r} is not writable: {exc.strerror or exc}") from None
    return p


def check_writable_file(path: str | os.PathLike[str], what: str) -> Path:
    """Prove now that a report can later be written at `path` (its folder is created if needed)."""
    p = Path(path)
    if p.is_dir():
        raise ReportPathError(f"{what} {str(p)!r} is a directory, not a file path")
    check_writable_dir(p.parent, f"the folder of {what} {str(p)!r},")
    if p.exists() and not os.access(p, os.W_OK):
        raise ReportPathError(f"{what} {str(p)!r} is not writable: permission denied")
    return p


def _model_device(model: nn.Module) -> str:
    for p in model.parameters():
        return str(p.device)
    for b in model.buffers():
        return str(b.device)
    return "cpu"


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's automatic garbage collection off while actdiag finishes a recorded step (then back as it was).

    That work is ours alone and makes no cyclic garbage worth collecting, but it allocates thousands of objects:
    the collections they set off promoted the step's short-lived objects (the vectors, the calls, records being
    built), and every object promoted brings the next full collection of the whole process closer. On the deep
    model that was half of them: ~10 ms of collection per recorded step (docs/performance.md). Nothing else
    changes: refcounting still frees what dies, and a collection due when we are done runs at the next allocation.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def check_every(every: int) -> int:
    """The recording interval, checked: a positive integer (not a bool)."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    return every


# Recording at least this many steps apart, every element of every tensor is read for every statistic: the cost is
# spread over the interval. Recording more often than that, the several passes of exact statistics over every
# element would dominate a recorded step, so by default large tensors' spread, zeros, histograms and update ratios
# come from their fixed sample instead, and on the CPU so do the spread, zeros and histograms of small tensors over
# SMALL_SAMPLE elements (`accuracy="exact"` forces exact ones); count, mean, min, max and the
# non-finite count are exact at every interval (CONTRACT.md, "Exactness"), on the CPU and on a GPU alike. Measured
# effect: BENCHMARKS.md and docs/performance.md.
EXACT_FROM_EVERY = 10

Accuracy = Literal["auto", "exact", "estimated"]
_ACCURACIES = ("auto", "exact", "estimated")


def exact_for(every: int, accuracy: Accuracy = "auto") -> bool:
    """Whether `watch(every=every, accuracy=accuracy)` reads every element for every statistic: "auto" does when
    `every >= EXACT_FROM_EVERY`."""
    if accuracy not in _ACCURACIES:
        raise ValueError(f"accuracy must be one of {', '.join(map(repr, _ACCURACIES))}, got {accuracy!r}")
    return accuracy == "exact" or (accuracy == "auto" and every >= EXACT_FROM_EVERY)


# Recording more often than EXACT_FROM_EVERY, a large tensor's histograms (and its estimated spread and zeros) come
# from half the usual sample: the sample's work is the part of a recorded step that scales with it, and at such
# intervals it is paid on many steps (measured effect: docs/performance.md). A histogram bin is then known to
# sqrt(p(1-p)/4096) <= 0.78% of the total instead of 0.55%, on each of the many steps recorded.
FREQUENT_SAMPLE_CAP = DEFAULT_SAMPLE_CAP // 2


def sample_cap_for(every: int) -> int:
    """The histogram sample of `watch(every=every)` unless told otherwise (`sample_cap=`)."""
    return DEFAULT_SAMPLE_CAP if exact_for(every) else FREQUENT_SAMPLE_CAP


class Monitor:
    """Records a model's statistics while it trains. Use through `actdiag.watch(...)`.

    Call `step()` once per training step, after `optimizer.step()`. Steps 0, every, 2*every, ... are recorded.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = DEFAULT_EVERY,
        logdir: str | os.PathLike[str] | None = None,
        include: Selector | Iterable[Selector] | None = None,
        exclude: Selector | Iterable[Selector] | None = None,
        bins: int = DEFAULT_BINS,
        sample_cap: int | None = None,
        track_weights: bool = True,
        track_updates: bool = True,
        accuracy: Accuracy = "auto",
        thresholds: Thresholds | Mapping[str, float] | None = None,
        max_history: int = DEFAULT_MAX_HISTORY,
        strict: bool = False,
        sinks: Sequence[Sink] = (),
        name: str | None = None,
        report_json: str | os.PathLike[str] | None = None,
        report_html: str | os.PathLike[str] | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        handle_sigterm: bool = True,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        functional: bool = True,
    ) -> None:
        self.model = unwrap_model(model)
        self.thresholds = make_thresholds(thresholds)
        self.every = check_every(every)
        self.strict = strict
        self.name = name or type(self.model).__name__
        self._warned: set[str] = set()
        self.recorder = Recorder(
            model,
            include=include,
            exclude=exclude,
            bins=bins,
            sample_cap=sample_cap_for(self.every) if sample_cap is None else sample_cap,
            track_weights=track_weights,
            track_updates=track_updates,
            exact=exact_for(self.every, accuracy),
            on_error=None if strict else self._fault,
            distributed=distributed,
            process_group=process_group,
            functional=functional,
        )
        # Under torch.distributed every rank records and merges, but only rank 0 writes (logs, reports, sinks).
        # With distributed=False each rank is on its own and writes its own reports.
        self.is_writer = not self.recorder.distributed or _dist.rank() == 0
        self.handle_sigterm = handle_sigterm
        self.logdir = None
        self.report_json = self.report_html = None
        self.sinks: list[Sink] = list(sinks) if self.is_writer else []
        if self.is_writer:
            # Checked now so that a bad path fails here, naming it, and not when the run ends hours later.
            if logdir is not None:
                self.logdir = check_writable_dir(logdir, "logdir")
            if report_json is not None:
                self.report_json = check_writable_file(report_json, "report_json")
            if report_html is not None:
                self.report_html = check_writable_file(report_html, "report_html")
        if self.logdir is not None:
            from actdiag.reports.tensorboard import TensorBoardSink

            self.sinks.append(TensorBoardSink(self.logdir))
        self.history_buffer = HistoryBuffer(max_points=max_history)
        self.optimizers = OptimizerWatch(self.model, optimizer, self.recorder.step_grads)
        self.latest: StepRecord | None = None
        self.first_nonfinite: Finding | None = None  # the run's first NaN/Inf, kept for the rest of the run
        self.steps = 0
        self.recorded_steps = 0
        self._active = False
        self._closed = False
        self._broken = False
        self._prev_handlers: dict[int, Any] = {}
        self._findings_cache: tuple[int, tuple[Finding, ...]] | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Monitor:
        self.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(keep_partial=exc_type is None)

    def start(self) -> Monitor:
        if self._active:
            return self
        if self._closed:
            raise RuntimeError("this monitor was closed; call actdiag.watch(...) again")
        self._active = True
        self.optimizers.start()
        self._install_signal_handlers()
        # Without a `with` block nothing else would flush at interpreter exit.
        atexit.register(self._close_at_exit)
        self._begin_if_due()
        return self

    def step(self) -> None:
        """Close the current training step (reading back its statistics if it was recorded), start the next."""
        with _critical():
            # A recorded step followed by another (every=1) keeps its hooks for it.
            self._end_step(keep_hooks=self._due(self.steps + 1))
            self._begin_if_due()

    def end_step(self) -> None:
        """Close the current training step without beginning the next; `begin_step()` begins it.

        For framework callbacks: trainers run evaluation between training steps, and between `end_step()` and
        `begin_step()` no hook is attached, so those passes are not mistaken for part of a training step.
        """
        self._end_step(keep_hooks=False)

    def _end_step(self, keep_hooks: bool) -> None:
        if not self._active:
            raise RuntimeError("monitor.step() called outside the watch; use it inside `with actdiag.watch(model)`")
        with _critical():
            if self.recorder.recording:
                self._finish_recorded(keep_hooks)
            self.steps += 1

    def begin_step(self) -> None:
        """Begin recording the current training step if it is due and not begun yet (safe to call repeatedly)."""
        if not self._active:
            raise RuntimeError("monitor.begin_step() called outside the watch")
        if not self.recorder.recording:
            self._begin_if_due()

    def read_gradients(self) -> None:
        """Read every parameter's `.grad` now, replacing what was seen while gradients accumulated.

        Call it right before `optimizer.step()` when gradients change after backward: accumulated over
        micro-batches, unscaled by an AMP grad scaler, clipped. Trainers' callbacks do this for you.
        """
        if self._active and self.recorder.recording:
            self.recorder.capture_param_grads()

    def close(self, keep_partial: bool = True) -> None:
        """Remove every hook; keep a recorded step in progress if it saw any forward pass; flush the sinks and
        write `report_json`/`report_html`. Runs on normal exit, on an exception, on Ctrl-C and on SIGTERM.

        Under torch.distributed a step in progress is dropped: finishing it takes a collective, and ranks that
        leave the loop differently (one by an exception) would wait on each other forever.
        """
        if self._closed:
            return
        with _critical():
            try:
                if self.recorder.recording:
                    if keep_partial and not self.recorder.distributed:
                        self._finish_recorded()
                    else:
                        self.recorder.abort()
            finally:
                self.recorder.abort()
                self.optimizers.stop()
                self._active = False
                self._closed = True
                atexit.unregister(self._close_at_exit)
                try:
                    self._flush()
                finally:
                    self._restore_signal_handlers()

    def _flush(self) -> None:
        if not (self.sinks or self.report_json or self.report_html):
            return
        try:
            report = self.report()
        except Exception as exc:  # noqa: BLE001 - what was recorded so far must not take training down
            if self.strict:
                raise
            self._fault("report", exc)
            return
        for sink in self.sinks:
            self._guarded_sink("sink", sink.on_close, report)
        if self.report_json is not None:
            self._guarded_sink("report_json", report.save_json, self.report_json)
        if self.report_html is not None:
            self._guarded_sink("report_html", report.save_html, self.report_html)

    def _close_at_exit(self) -> None:
        self.close(keep_partial=False)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        """While the watch is open: SIGTERM becomes SystemExit(143), so that `with` blocks unwind and what was
        recorded is flushed (a plain SIGTERM ends the process without running any Python cleanup); SIGTERM and
        Ctrl-C arriving while actdiag itself is writing (a sink, a report) take effect right after it, so that
        the exception never lands inside a half-done write. Only signals still at their default action are
        taken over: a handler set by the user or a launcher is left alone."""
        if not self.handle_sigterm or threading.current_thread() is not threading.main_thread():
            return
        defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
        for signum, default in defaults.items():
            try:
                if signal.getsignal(signum) is default:
                    self._prev_handlers[signum] = signal.signal(signum, _on_signal)
            except (ValueError, OSError):  # not the main interpreter, or a platform without the signal
                pass

    def _restore_signal_handlers(self) -> None:
        handlers, self._prev_handlers = self._prev_handlers, {}
        for signum, prev in handlers.items():
            try:
                if signal.getsignal(signum) is _on_signal:
                    signal.signal(signum, prev)
            except (ValueError, OSError):
                pass

    # ------------------------------------------------------------------ results
    @property
    def history(self) -> History:
        return self.history_buffer.snapshot()

    @property
    def findings(self) -> tuple[Finding, ...]:
        """The findings for what was recorded so far, ranked most severe first."""
        if self._findings_cache is not None and self._findings_cache[0] == self.recorded_steps:
            return self._findings_cache[1]
        found: tuple[Finding, ...] = ()
        if self.latest is not None:
            try:
                # The rules diagnose; what to try for each finding is attached after, from the same layers.
                layers = self.latest.layers
                found = attach_fixes(
                    rules.diagnose(
                        layers,
                        self.latest.params,
                        self.history,
                        thresholds=self.thresholds,
                        first_nonfinite=self.first_nonfinite,
                    ),
                    layers,
                    model=self.model,
                )
            except Exception as exc:  # noqa: BLE001
                if self.strict:
                    raise
                self._fault("rules", exc)
        self._findings_cache = (self.recorded_steps, found)
        return found

    def report(self) -> Report:
        latest = self.latest
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return Report(
            model=ModelInfo(name=self.name, parameters=n_params, trainable_parameters=n_train),
            run=RunInfo(
                steps=self.steps,
                recorded_steps=self.recorded_steps,
                device=_model_device(self.model),
                torch=torch.__version__,
                actdiag=__version__,
                every=self.every,
            ),
            layers=latest.layers if latest else (),
            params=latest.params if latest else (),
            findings=self.findings,
            history=self.history,
        )

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON report. Under torch.distributed only rank 0 writes; other ranks return the path."""
        if not self.is_writer:
            return Path(path)
        return self.report().save_json(Path(path))

    def save_html(self, path: str | os.PathLike[str]) -> Path:
        """Write the HTML report. Under torch.distributed only rank 0 writes; other ranks return the path."""
        if not self.is_writer:
            return Path(path)
        return self.report().save_html(Path(path))

    def __repr__(self) -> str:
        from actdiag.reports.notebook import monitor_repr

        return monitor_repr(self)

    def _repr_html_(self) -> str:
        from actdiag.reports.notebook import monitor_html

        return monitor_html(self)

    # ------------------------------------------------------------------ internals
    def _due(self, step: int) -> bool:
        return not self._broken and step % self.every == 0

    def _begin_if_due(self) -> None:
        if not self._due(self.steps):
            self.recorder.release_hooks()
            return
        try:
            self.recorder.begin(self.steps)
            self.optimizers.begin()
        except Exception as exc:  # noqa: BLE001
            self._give_up(exc)

    def _finish_recorded(self, keep_hooks: bool = False) -> None:
        with _collector_paused():
            self._finish(keep_hooks)

    def _finish(self, keep_hooks: bool) -> None:
        try:
            record = self.recorder.end(keep_hooks, self.optimizers.end())
            if record is None:
                return
            self.history_buffer.add(record)
        except Exception as exc:  # noqa: BLE001 - reading back or decoding failed: stop recording, keep training
            self._give_up(exc)
            return
        previous, self.latest = self.latest, record
        self.recorded_steps += 1
        # A run that became finite again (a loss scaler skipped an overflowing step) starts a new episode.
        if self.first_nonfinite is None or not any_nonfinite(record):
            try:
                self.first_nonfinite = nonfinite_event(record, previous, self.thresholds)
            except Exception as exc:  # noqa: BLE001 - a rule must never kill training
                if self.strict:
                    raise
                self._fault("rules", exc)
        for sink in self.sinks:
            self._guarded_sink("sink", sink.on_record, record)

    def _give_up(self, exc: Exception) -> None:
        self.recorder.abort()
        if self.strict:
            raise exc
        self._broken = True
        self._fault("recording", exc)

    def _guarded_sink(self, part: str, fn: Any, *args: Any) -> None:
        key = f"{part}:{type(getattr(fn, '__self__', fn)).__name__}"
        if key in self._warned:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - a sink must never kill training
            if self.strict:
                raise
            self._fault(key, exc)

    def _fault(self, part: str, exc: BaseException) -> None:
        if part in self._warned:
            return
        self._warned.add(part)
        warnings.warn(
            f"actdiag: {part} failed and is switched off for this run ({type(exc).__name__}: {exc}); "
            "training continues. Use strict=True to raise instead.",
            RuntimeWarning,
            stacklevel=3,
        )


# Signals that end the run are held while actdiag itself writes (see Monitor._install_signal_handlers).
_critical_depth = 0
_deferred_signal: int | None = None


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    # 128 + signal number is the status a shell reports for a process killed by that signal.
    raise SystemExit(128 + signum)


def _on_signal(signum: int, frame: Any) -> None:
    global _deferred_signal
    if _critical_depth:
        _deferred_signal = signum
        return
    _raise_for(signum)


@contextmanager
def _critical() -> Iterator[None]:
    """A stretch of actdiag's own work (reading back a step, feeding sinks, writing reports) that a signal must
    not cut in half; a signal that arrives meanwhile is acted on when the outermost stretch ends."""
    global _critical_depth, _deferred_signal
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
    if _critical_depth == 0 and _deferred_signal is not None:
        signum, _deferred_signal = _deferred_signal, None
        _raise_for(signum)


def watch(
    model: nn.Module,
    every: int = DEFAULT_EVERY,
    logdir: str | os.PathLike[str] | None = None,
    *,
    include: Selector | Iterable[Selector] | None = None,
    exclude: Selector | Iterable[Selector] | None = None,
    bins: int = DEFAULT_BINS,
    sample_cap: int | None = None,
    track_weights: bool = True,
    track_updates: bool = True,
    accuracy: Accuracy = "auto",
    thresholds: Thresholds | Mapping[str, float] | None = None,
    max_history: int = DEFAULT_MAX_HISTORY,
    strict: bool = False,
    sinks: Sequence[Sink] = (),
    name: str | None = None,
    report_json: str | os.PathLike[str] | None = None,
    report_html: str | os.PathLike[str] | None = None,
    distributed: bool | None = None,
    process_group: Any = None,
    handle_sigterm: bool = True,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    functional: bool = True,
) -> Monitor:
    """Watch `model` while it trains: `with actdiag.watch(model, every=10, logdir="runs/x") as monitor: ...`.

    Args:
        model: the module to watch (DDP, DataParallel and torch.compile wrappers are looked through).
        every: record steps 0, every, 2*every, ... (call `monitor.step()` once per training step).
        logdir: write TensorBoard event files there.
        include, exclude: which modules to watch: fnmatch patterns on qualified names, or module types.
        bins: bins of each tensor's linear histogram.
        sample_cap: how many elements of a large tensor its histograms come from; None: DEFAULT_SAMPLE_CAP, or
            FREQUENT_SAMPLE_CAP when `every < EXACT_FROM_EVERY`.
        track_weights, track_updates: record parameters' statistics, and their update ratios.
        accuracy: "exact" reads every element for every statistic; "estimated" lets large tensors' std, zero
            fraction, histograms and update ratios come from their fixed sample (each record names the fields
            that did, `TensorStats.estimated`); "auto" is exact when `every >= EXACT_FROM_EVERY`, estimated
            otherwise. Count, mean, min, max, abs_max and the non-finite count are exact whatever it says.
        thresholds: the rules' thresholds (`actdiag.Thresholds`); None: the documented defaults.
        max_history: points kept per metric in the history (older ones are thinned).
        strict: raise instead of warning when actdiag itself fails.
        sinks: more sinks fed each recorded step.
        name: the run's name in reports (default: the model's class name).
        report_json, report_html: written when the watch closes, however it closes (normal exit, exception,
            Ctrl-C or SIGTERM); the paths are checked at once.
        distributed: None merges each recorded step across ranks when torch.distributed is initialised; False
            leaves each rank on its own.
        process_group: the group to merge over (default: the world).
        handle_sigterm: SIGTERM unwinds the `with` block as SystemExit(143) so that what was recorded is flushed,
            and SIGTERM or Ctrl-C arriving while actdiag writes takes effect right after the write.
        optimizer: the optimizer(s) whose learning rate, kind and stepped gradient the update rules read; None:
            any optimizer that steps the model's parameters, seen through torch's global optimizer step hooks.
        functional: also record activations applied as functions in a forward (`F.relu`, `torch.tanh`,
            `x.sigmoid()`, ...), as `<enclosing module>:<function>` records (looked for on every recorded step once
            one is found, until then after 1, 2, 4, ... 32 recorded steps: see actdiag/hooks/functional.py).
    """
    return Monitor(
        model,
        every=every,
        logdir=logdir,
        include=include,
        exclude=exclude,
        bins=bins,
        sample_cap=sample_cap,
        track_weights=track_weights,
        track_updates=track_updates,
        accuracy=accuracy,
        thresholds=thresholds,
        max_history=max_history,
        strict=strict,
        sinks=sinks,
        name=name,
        report_json=report_json,
        report_html=report_html,
        distributed=distributed,
        process_group=process_group,
        handle_sigterm=handle_sigterm,
        optimizer=optimizer,
        functional=functional,
    )
