"""ActdiagCallback with a real Hugging Face Trainer on CPU: a tiny GPT-2 from a config, a few steps, no download."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'actdiag[transformers]')")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing below may reach the Hub

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from actdiag.integrations.transformers import ActdiagCallback  # noqa: E402
from tests.integrations._tb import actdiag_tags  # noqa: E402

TRAIN_BATCH, EVAL_BATCH = 4, 3


class Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(n))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(tmp_path: Path, callback: ActdiagCallback, **arg_kwargs: Any) -> Trainer:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    kwargs: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": 4,
        "per_device_train_batch_size": TRAIN_BATCH,
        "per_device_eval_batch_size": EVAL_BATCH,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "logging_steps": 2,
    }
    kwargs.update(arg_kwargs)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**kwargs),
        train_dataset=Tokens(32),
        eval_dataset=Tokens(6),
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def test_integ_hf_records_training_steps_not_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = ActdiagCallback(every=1, tensorboard=False)
    trainer = _train(tmp_path, callback)
    monitor = callback.monitor
    assert monitor is not None and monitor.latest is not None
    assert monitor.steps == trainer.state.global_step == 4
    assert monitor.recorded_steps == 4
    labels = [layer.label for layer in monitor.latest.layers]
    assert "transformer.h.0.attn.c_attn" in labels and "lm_head" in labels
    assert not any("#" in label for label in labels)  # evaluation (batches of 3) ran twice but was not recorded
    assert {layer.shape[0] for layer in monitor.latest.layers} <= {1, TRAIN_BATCH}  # 1: position embeddings
    assert isinstance(callback.findings, tuple) and callback.findings == monitor.findings
    assert "actdiag: recorded 4 of 4 steps (every 1)" in capsys.readouterr().out
    assert all(not m._forward_hooks for m in trainer.model.modules())
    assert not _global_forward_hooks and not _global_forward_pre_hooks  # torch's global ones


def test_integ_hf_reads_clipped_gradients_before_optimizer_step(tmp_path: Path) -> None:
    """on_pre_optimizer_step comes after clipping: the recorded weight gradients have the clipped total norm."""
    callback = ActdiagCallback(every=1, tensorboard=False, verbose=False)
    _train(tmp_path, callback, max_steps=2, max_grad_norm=1e-3, gradient_accumulation_steps=2)
    assert callback.monitor is not None and callback.monitor.steps == 2
    latest = callback.monitor.latest
    assert latest is not None
    total = math.sqrt(sum(p.grad.norm**2 for p in latest.params if p.grad is not None))
    assert total == pytest.approx(1e-3, rel=1e-3)


def test_integ_hf_writes_into_trainer_tensorboard_run(tmp_path: Path) -> None:
    callback = ActdiagCallback(every=2, verbose=False)
    _train(tmp_path, callback, report_to=["tensorboard"])
    assert callback.logdir is not None
    runs = list((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 1 and callback.logdir.resolve() == runs[0].resolve()  # the Trainer's own run directory
    tags = actdiag_tags(callback.logdir)
    assert "activations/lm_head" in tags
    assert "train/loss" in tags  # written by the Trainer's TensorBoard callback into the same run


def test_integ_hf_own_logdir_without_tensorboard_reporting(tmp_path: Path) -> None:
    callback = ActdiagCallback(every=2, verbose=False)
    _train(tmp_path, callback, max_steps=2)
    assert callback.logdir is not None and callback.logdir.resolve() == (tmp_path / "out" / "actdiag").resolve()
    assert "activations/lm_head" in actdiag_tags(callback.logdir)
