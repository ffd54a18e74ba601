"""On a GPU: recorded and unrecorded steps make no host synchronisation beyond the one read-back."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import actdiag
from actdiag.hooks.stats import _SAMPLES, decode_tensor_stats, tensor_stats

pytestmark = pytest.mark.gpu


# accuracy="auto" at every=2 is the estimated path for tensors over the sample (recording often); "exact" the other.
@pytest.mark.parametrize("accuracy", ["exact", "auto"])
def test_no_hidden_synchronisation_on_cuda(accuracy: str) -> None:
    exact = accuracy == "exact"
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
    seen: list[torch.Tensor] = []  # the first layer's output in each recorded step, for the reference below

    def keep(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
        if mon.recorder.recording:
            seen.append(out.detach().double().clone())

    with actdiag.watch(model, every=2, sample_cap=1024, accuracy=accuracy) as mon:
        model[0].register_forward_hook(keep)
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
    got, ref = mon.latest.layers[0].activation, seen[-1]
    assert got.count == 32 * 16 * 8 * 8 and bool(got.estimated) is not exact
    assert got.mean == pytest.approx(ref.mean().item(), rel=1e-4, abs=1e-6)
    assert (got.min, got.max) == (ref.min().item(), ref.max().item())  # exact at every interval
    # Estimated: the spread of a 1024-element sample of the 32768.
    assert got.std == pytest.approx(ref.std(unbiased=False).item(), rel=1e-3 if exact else 0.1)


def test_estimated_statistics_on_cuda_are_sync_free_and_exact_where_promised() -> None:
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(0)) * 3 + 1
    x[::1000] = math.nan
    x[7] = math.inf
    xc = x.cuda()
    tensor_stats(xc, sample_cap=5000, exact=False)  # warm-up: the sample index, drawn on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        vec, meta = tensor_stats(xc, sample_cap=5000, exact=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    s = decode_tensor_stats(vec.cpu().numpy(), meta)
    a = x.double().numpy()
    fin = a[np.isfinite(a)]
    assert meta.estimated and s.count == fin.size and s.nonfinite_count == 301
    assert s.mean == pytest.approx(fin.mean(), rel=1e-5)
    smp = a[_SAMPLES.get(x.numel(), 5000, xc.device).cpu().numpy()]
    smp = smp[np.isfinite(smp)]
    assert s.min == fin.min() and s.max == fin.max() and s.histogram.total == smp.size  # extremes: every element
    assert s.std == pytest.approx(np.sqrt(((smp - s.mean) ** 2).mean()), rel=1e-5)
