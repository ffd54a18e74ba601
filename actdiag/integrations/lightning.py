"""Lightning: `Trainer(callbacks=[ActdiagCallback(every=10)])` records the LightningModule while it trains.

Each training step is recorded from its first batch's forward to just after its optimizer step; gradients are read
in `on_before_optimizer_step`, where Lightning has accumulated and unscaled (AMP) them. Validation runs
between steps with no hook attached. TensorBoard output goes into the trainer's TensorBoardLogger run directory,
beside Lightning's own scalars, and into `logdir` (default `<default_root_dir>/actdiag`) when there is no such logger.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from actdiag.integrations._common import missing_extra, summary
from actdiag.monitor import DEFAULT_EVERY, Monitor, watch
from actdiag.records import Finding

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:  # the older standalone distribution has the same API under another name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.loggers import TensorBoardLogger  # type: ignore[assignment]
    except ImportError as exc:
        raise missing_extra("lightning", "Lightning", "lightning") from exc


class ActdiagCallback(pl.Callback):
    """Watch the LightningModule during `fit`; `.findings` holds the ranked findings once training ends, and
    `.monitor` the closed Monitor (`.monitor.report()`, `.monitor.save_json(path)`, `.monitor.history`).

    `tensorboard=False` writes no event files. Other keyword arguments go to `actdiag.watch` (include, exclude,
    bins, track_updates, strict, ...). `verbose` prints the findings at the end of training on rank zero.
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
        self._stepped = False
        self._running = False

    def _choose_logdir(self, trainer: pl.Trainer) -> str | os.PathLike[str] | None:
        # Only rank zero writes; other ranks still record (their statistics are merged under DDP).
        if not self.tensorboard or not trainer.is_global_zero:
            return None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.log_dir
        return self._own_logdir if self._own_logdir is not None else os.path.join(trainer.default_root_dir, "actdiag")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.findings = ()
        self._stepped = False
        self.monitor = watch(pl_module, every=self.every, logdir=self._choose_logdir(trainer), **self._watch_kwargs)
        self.logdir = self.monitor.logdir
        self.monitor.start()
        self._running = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._running and self.monitor is not None:
            self.monitor.begin_step()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._running and self.monitor is not None:
            self.monitor.read_gradients()
            self._stepped = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With gradient accumulation several batches make one optimizer step: close the step only after it.
        if self._running and self.monitor is not None and self._stepped:
            self._stepped = False
            self.monitor.end_step()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._running or self.monitor is None:
            return
        self._running = False
        self.monitor.close()
        self.findings = self.monitor.findings
        if self.verbose and trainer.is_global_zero:
            print(summary(self.monitor, self.findings, self.logdir), flush=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Hooks come off even when training fails; a half-finished step is dropped.
        if self._running and self.monitor is not None:
            self._running = False
            self.monitor.close(keep_partial=False)
