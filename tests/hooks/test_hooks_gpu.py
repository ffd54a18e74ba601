"""On a GPU: recorded and unrecorded steps make no host synchronisation beyond the one read-back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import actdiag

pytestmark = pytest.mark.gpu


def test_no_hidden_synchronisation_on_cuda() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
        nn.Tanh(),
    ).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 3, 8, 8, device="cuda")
    with actdiag.watch(model, every=2, sample_cap=1024) as mon:
        for _ in range(2):  # warm-up: allocator, sample indices
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            mon.step()  # noqa: E702
        torch.cuda.synchronize()
        for _ in range(4):
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(x).sum().backward()
                opt.step()
                opt.zero_grad()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            mon.step()  # the single read-back of a recorded step happens here, outside the checked region
    assert mon.recorded_steps == 3
    assert mon.latest.layers[0].activation.count == 32 * 16 * 8 * 8
    ref = model[0](x).double()
    assert mon.latest.layers[0].activation.std == pytest.approx(ref.std(unbiased=False).item(), rel=1e-3)
