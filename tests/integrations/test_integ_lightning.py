"""ActdiagCallback with a real Lightning Trainer on CPU: tiny model, a few steps."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="lightning is not installed (pip install 'actdiag[lightning]')")

from actdiag.integrations.lightning import ActdiagCallback  # noqa: E402
from tests.integrations._tb import actdiag_tags  # noqa: E402

TRAIN_BATCH, VAL_BATCH = 16, 6


class Tiny(pl.LightningModule):
    def __init__(self, fail_at: int | None = None, grad_factor: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 1))
        self.fail_at = fail_at
        self.grad_factor = grad_factor
        self.seen_grads: list[np.ndarray] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val", nn.functional.mse_loss(self.net(x), y))

    def on_after_backward(self) -> None:
        # Stands in for what happens to gradients between backward and the optimizer step (AMP unscaling).
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(self.grad_factor)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        w = self.net[0].weight.grad
        assert w is not None
        self.seen_grads.append(w.detach().double().numpy().copy())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 5, generator=g), torch.randn(64, 1, generator=g))
    return DataLoader(data, batch_size=TRAIN_BATCH), DataLoader(data, batch_size=VAL_BATCH)


def _fit(module: Tiny, callback: ActdiagCallback, root: Path, **trainer_kwargs: Any) -> pl.Trainer:
    kwargs: dict[str, Any] = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "default_root_dir": str(root),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "num_sanity_val_steps": 1,
    }
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=[callback], **kwargs)
    train, val = _loaders()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, train, val)
    return trainer


def test_integ_lightning_records_training_steps_not_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    callback = ActdiagCallback(every=1, tensorboard=False)
    trainer = _fit(Tiny(), callback, tmp_path)
    monitor = callback.monitor
    assert monitor is not None
    assert monitor.steps == trainer.global_step == 8  # 64 samples / 16 per batch * 2 epochs
    assert monitor.recorded_steps == 8
    assert monitor.latest is not None
    # Validation (batches of 6) ran after every epoch and in the sanity check; none of it is in the records.
    assert [layer.label for layer in monitor.latest.layers] == ["net.0", "net.1", "net.2"]
    assert {layer.shape[0] for layer in monitor.latest.layers} == {TRAIN_BATCH}
    assert all(layer.gradient is not None for layer in monitor.latest.layers)
    assert isinstance(callback.findings, tuple)
    assert callback.findings == monitor.findings
    assert callback.logdir is None
    assert "actdiag: recorded 8 of 8 steps (every 1)" in capsys.readouterr().out
    # Hooks are gone once training ends.
    assert all(not m._forward_hooks for m in trainer.lightning_module.modules())
    assert not _global_forward_hooks and not _global_forward_pre_hooks  # torch's global ones


def test_integ_lightning_reads_gradients_before_optimizer_step(tmp_path: Path) -> None:
    """With accumulation over 2 batches and gradients rescaled after backward, the recorded weight gradient is the
    one the optimizer steps with."""
    module = Tiny(grad_factor=0.5)
    callback = ActdiagCallback(every=1, tensorboard=False, verbose=False)
    trainer = _fit(module, callback, tmp_path, max_epochs=1, accumulate_grad_batches=2)
    assert trainer.global_step == 2
    assert callback.monitor is not None and callback.monitor.steps == 2
    latest = callback.monitor.latest
    assert latest is not None
    recorded = next(p for p in latest.params if p.name == "net.0.weight").grad
    assert recorded is not None
    final = module.seen_grads[-1]
    assert recorded.norm == pytest.approx(float(np.linalg.norm(final)), rel=1e-5)
    assert recorded.mean == pytest.approx(float(final.mean()), rel=1e-5, abs=1e-12)


def test_integ_lightning_writes_into_tensorboard_logger_run(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="exp")
    callback = ActdiagCallback(every=2, verbose=False)
    _fit(Tiny(), callback, tmp_path, logger=logger)
    assert callback.logdir is not None
    assert callback.logdir.resolve() == Path(logger.log_dir).resolve()
    assert "activations/net.0" in actdiag_tags(callback.logdir)
    assert [p.name for p in (tmp_path / "exp").iterdir()] == ["version_0"]  # one run, no extra sub-run


def test_integ_lightning_own_logdir_without_tensorboard_logger(tmp_path: Path) -> None:
    callback = ActdiagCallback(every=4, logdir=tmp_path / "mine", verbose=False)
    _fit(Tiny(), callback, tmp_path, max_epochs=1)
    assert callback.logdir is not None and callback.logdir.resolve() == (tmp_path / "mine").resolve()
    assert "activations/net.2" in actdiag_tags(callback.logdir)
    default = ActdiagCallback(every=4, verbose=False)
    _fit(Tiny(), default, tmp_path / "root", max_epochs=1)
    assert default.logdir is not None and default.logdir.resolve() == (tmp_path / "root" / "actdiag").resolve()


def test_integ_lightning_exception_removes_hooks(tmp_path: Path) -> None:
    module = Tiny(fail_at=2)
    callback = ActdiagCallback(every=1, tensorboard=False, verbose=False)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(module, callback, tmp_path)
    assert all(not m._forward_hooks for m in module.modules())
    assert not _global_forward_hooks and not _global_forward_pre_hooks  # torch's global ones
    assert callback.monitor is not None and callback.monitor.recorded_steps == 2
    assert all(math.isfinite(layer.activation.std) for layer in callback.monitor.latest.layers if layer.activation)


def test_integ_lightning_float16_grad_scaler_gradients_are_unscaled(tmp_path: Path) -> None:
    """Float16 AMP with a GradScaler (on CPU here): backward produces gradients multiplied by the loss scale, and
    Lightning unscales them before on_before_optimizer_step. The recorded weight gradient is the unscaled one."""
    from lightning.pytorch.plugins import MixedPrecision

    scale = 1024.0
    module = Tiny()
    callback = ActdiagCallback(every=1, tensorboard=False, verbose=False)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=scale))
    _fit(module, callback, tmp_path, max_steps=2, plugins=[plugin], num_sanity_val_steps=0)
    latest = callback.monitor.latest if callback.monitor else None
    assert latest is not None
    assert {layer.dtype for layer in latest.layers if layer.type == "Linear"} == {"float16"}
    recorded = next(p for p in latest.params if p.name == "net.0.weight").grad
    assert recorded is not None
    assert recorded.norm == pytest.approx(float(np.linalg.norm(module.seen_grads[-1])), rel=1e-5)
