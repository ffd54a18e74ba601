"""Hugging Face Trainer: `Trainer(..., callbacks=[ActdiagCallback(every=10)])` records the model while it trains.

Each optimizer step is recorded from `on_step_begin` to `on_step_end`; gradients are read in
`on_pre_optimizer_step`, after accumulation, unscaling and clipping. Evaluation runs after `on_step_end`, with no hook
attached. TensorBoard output goes to the run directory of the Trainer's TensorBoard reporting (`report_to`
includes "tensorboard") and to `logdir` (default `<output_dir>/actdiag`) otherwise.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from actdiag.integrations._common import missing_extra, summary
from actdiag.monitor import DEFAULT_EVERY, Monitor, watch
from actdiag.records import Finding

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as exc:
    raise missing_extra("transformers", "Hugging Face Transformers", "transformers") from exc


def _tensorboard_dir(args: TrainingArguments) -> str | None:
    """The directory the Trainer's own TensorBoard callback writes to, or None when it is not reporting there."""
    if "tensorboard" not in (args.report_to or []):
        return None
    # transformers 4.x: an argument; both versions honour the TENSORBOARD_LOGGING_DIR variable.
    explicit = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
    if explicit:
        return os.path.expanduser(explicit)
    # transformers 5 names the run when training begins, `<output_dir>/runs/<time>_<host>` as PyTorch's
    # SummaryWriter does. Reporting callbacks come before user callbacks, so the directory exists by now and the
    # newest one for this host is this run's.
    runs = [d for d in Path(args.output_dir or ".", "runs").glob(f"*_{socket.gethostname()}") if d.is_dir()]
    return str(max(runs, key=lambda d: d.stat().st_mtime)) if runs else None


class ActdiagCallback(TrainerCallback):
    """Watch the Trainer's model; `.findings` holds the ranked findings once training ends, and `.monitor` the
    closed Monitor (`.monitor.report()`, `.monitor.save_json(path)`, `.monitor.history`).

    `tensorboard=False` writes no event files. Other keyword arguments go to `actdiag.watch` (include, exclude,
    bins, track_updates, strict, ...). `verbose` prints the findings at the end of training on the main process.
    """

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        logdir: str | os.PathLike[str] | None = None,
        *,
        tensorboard: bool = True,
        verbose: bool = True,
        **watch_kwargs: Any,
    ) -> None:
        self.every = every
        self.tensorboard = tensorboard
        self.verbose = verbose
        self._own_logdir = logdir
        self._watch_kwargs = watch_kwargs
        self.monitor: Monitor | None = None
        self.logdir: Path | None = None
        self.findings: tuple[Finding, ...] = ()
        self._running = False

    def _choose_logdir(self, args: TrainingArguments, state: TrainerState) -> str | os.PathLike[str] | None:
        # Only the main process writes; the others still record (their statistics are merged under DDP).
        if not self.tensorboard or not state.is_world_process_zero:
            return None
        found = _tensorboard_dir(args)
        if found is not None:
            return found
        return self._own_logdir if self._own_logdir is not None else os.path.join(args.output_dir or ".", "actdiag")

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if model is None:
            raise ValueError("ActdiagCallback needs the Trainer's model; the Trainer passes it to callbacks")
        self.findings = ()
        self.monitor = watch(model, every=self.every, logdir=self._choose_logdir(args, state), **self._watch_kwargs)
        self.logdir = self.monitor.logdir
        self.monitor.start()
        self._running = True

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._running and self.monitor is not None:
            self.monitor.begin_step()

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._running and self.monitor is not None:
            self.monitor.read_gradients()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._running and self.monitor is not None:
            self.monitor.end_step()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not self._running or self.monitor is None:
            return
        self._running = False
        self.monitor.close()
        self.findings = self.monitor.findings
        if self.verbose and state.is_world_process_zero:
            print(summary(self.monitor, self.findings, self.logdir), flush=True)
