"""Activation checkpointing: a layer recomputed during backward is counted once, with the statistics (and the
gradient statistics) of the same model without checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import actdiag


class Net(nn.Module):
    """stem -> block (Linear, ReLU, Linear, Tanh; optionally checkpointed) -> head."""

    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.reentrant is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


def _record(model: nn.Module, steps: int = 2) -> actdiag.StepRecord:
    g = torch.Generator().manual_seed(0)
    with actdiag.watch(model, every=1, strict=True) as monitor:
        for _ in range(steps):
            model(torch.randn(8, 6, generator=g)).pow(2).mean().backward()
            model.zero_grad()
            monitor.step()
    assert monitor.latest is not None
    return monitor.latest


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_rel_checkpointed_layers_counted_once_with_same_stats(reentrant: bool) -> None:
    torch.manual_seed(0)
    plain = Net(reentrant=None)
    ckpt = copy.deepcopy(plain)
    ckpt.reentrant = reentrant
    want = _record(plain)
    got = _record(ckpt)
    assert [layer.label for layer in got.layers] == [layer.label for layer in want.layers]
    assert all(layer.call == 0 for layer in got.layers)  # the recomputation is not a second call
    for a, b in zip(got.layers, want.layers):
        assert a.activation is not None and b.activation is not None
        assert a.activation.count == b.activation.count
        assert a.activation.mean == pytest.approx(b.activation.mean, rel=1e-6, abs=1e-9)
        assert a.activation.std == pytest.approx(b.activation.std, rel=1e-6)
        assert (a.gradient is None) == (b.gradient is None), a.label
        if a.gradient is not None and b.gradient is not None:
            assert a.gradient.count == b.gradient.count
            assert a.gradient.std == pytest.approx(b.gradient.std, rel=1e-6)
        assert a.dead_fraction == b.dead_fraction and a.saturation == b.saturation
