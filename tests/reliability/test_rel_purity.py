"""Purity: watching a model changes nothing. Outputs, gradients, parameters, buffers and the RNG state are the same
bit for bit with and without actdiag, across real-model shapes (CPU)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

import actdiag


class ConvNet(nn.Module):
    """Conv -> BatchNorm -> in-place ReLU -> pool -> dropout -> linear (in-place ops after hooked outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h += 0.5  # an in-place op on a hooked output
        return self.head(self.drop(h.flatten(1)))


class TinyTransformer(nn.Module):
    """Embedding of integer tokens -> transformer encoder layer (dropout) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.out = nn.Linear(16, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.enc(self.emb(tokens)))


class LSTMNet(nn.Module):
    """LSTM (tuple output with a nested tuple) -> linear on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 12, num_layers=2, batch_first=True, dropout=0.2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, (h, c) = self.lstm(x)
        return self.fc(out[:, -1]) + 0.0 * h.sum() + 0.0 * c.sum()


class DictTupleNet(nn.Module):
    """A shared (twice-called) linear, a frozen layer, a tuple-returning submodule and a dict output."""

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.a(x)
            return torch.tanh(y), torch.sigmoid(y)

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.pair = self.Pair()
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.act(self.shared(x))
        h = self.shared(self.frozen(h))  # second call of the shared module
        t, s = self.pair(h)
        return {"logits": t, "gate": s}


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[torch.Generator], Any]
    loss: Callable[[Any], torch.Tensor]
    watch: dict[str, Any]
    autocast: bool = False
    train: bool = True


def _loss_sum(out: Any) -> torch.Tensor:
    if isinstance(out, dict):
        return sum(v.float().pow(2).mean() for v in out.values())  # type: ignore[return-value]
    return out.float().pow(2).mean()


CASES = [
    Case("cnn_inplace_relu", ConvNet, lambda g: torch.randn(4, 3, 8, 8, generator=g), _loss_sum, {"every": 1}),
    Case(
        "transformer_int_tokens",
        TinyTransformer,
        lambda g: torch.randint(0, 50, (3, 7), generator=g),
        _loss_sum,
        {"every": 1, "sample_cap": 16},  # also the sampled-histogram path
    ),
    Case("lstm", LSTMNet, lambda g: torch.randn(3, 5, 6, generator=g), _loss_sum, {"every": 2}),
    Case("dict_tuple_shared_frozen", DictTupleNet, lambda g: torch.randn(5, 8, generator=g), _loss_sum, {"every": 1}),
    Case(
        "autocast_bf16",
        ConvNet,
        lambda g: torch.randn(4, 3, 8, 8, generator=g),
        _loss_sum,
        {"every": 1},
        autocast=True,
    ),
    Case(
        "eval_no_grad_transformer",
        TinyTransformer,
        lambda g: torch.randint(0, 50, (3, 7), generator=g),
        _loss_sum,
        {"every": 1},
        train=False,
    ),
    Case(
        "eval_no_grad_cnn",
        ConvNet,
        lambda g: torch.randn(4, 3, 8, 8, generator=g),
        _loss_sum,
        {"every": 1},
        train=False,
    ),
]


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out.detach().clone()]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flatten(out[k])]
    return [t for item in out for t in _flatten(item)]


def _run(case: Case, model: nn.Module, watched: bool, steps: int = 4) -> dict[str, Any]:
    torch.manual_seed(7)  # dropout draws from the global RNG: both runs start from the same state
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train(case.train)
    seen: dict[str, Any] = {"outputs": [], "grads": []}
    monitor = actdiag.watch(model, strict=True, **case.watch) if watched else None
    if monitor is not None:
        monitor.start()
    try:
        for _ in range(steps):
            x = case.make_input(g)
            if not case.train:
                with torch.no_grad():
                    out = model(x)
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.autocast):
                    out = model(x)
                case.loss(out).backward()
                seen["grads"].append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
                opt.step()
                opt.zero_grad(set_to_none=True)
            seen["outputs"].append(_flatten(out))
            if monitor is not None:
                monitor.step()
    finally:
        if monitor is not None:
            monitor.close()
    seen["params"] = [p.detach().clone() for p in model.parameters()]
    seen["buffers"] = [b.clone() for b in model.buffers()]
    seen["rng"] = torch.get_rng_state()
    seen["training"] = model.training
    seen["recorded"] = monitor.recorded_steps if monitor is not None else None
    return seen


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rel_watching_changes_nothing(case: Case) -> None:
    torch.manual_seed(11)
    base = case.build()
    plain = _run(case, copy.deepcopy(base), watched=False)
    model = copy.deepcopy(base)
    watched = _run(case, model, watched=True)
    for key in ("outputs", "grads", "params", "buffers", "rng", "training"):
        assert _same(plain[key], watched[key]), f"{case.name}: {key} differ with actdiag"
    assert watched["recorded"] >= 2  # it did record
    assert all(not m._forward_hooks for m in model.modules())
    assert not _global_forward_hooks and not _global_forward_pre_hooks  # torch's global ones
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # type: ignore[attr-defined]
