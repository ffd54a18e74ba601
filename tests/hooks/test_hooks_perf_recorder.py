"""The recorder's cheaper bookkeeping keeps its meaning: weights are measured as the forward pass used them, frozen
and unused weights are still measured, and the sampled update ratio agrees with the exact one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import actdiag
from actdiag.hooks.recorder import Recorder


def reference_stats(t: torch.Tensor) -> tuple[float, float]:
    a = t.detach().double().numpy().ravel()
    return float(a.mean()), float(a.std())


def test_weights_are_measured_before_the_update_and_frozen_ones_too() -> None:
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    model[2].bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.9)
    x = torch.randn(12, 5)
    with actdiag.watch(model, every=1) as mon:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        mon.step()
    params = {p.name: p for p in mon.latest.params}
    assert set(params) == set(before)
    for name, w0 in before.items():
        mean, std = reference_stats(w0)
        assert params[name].weight.mean == pytest.approx(mean, rel=1e-5, abs=1e-7)
        assert params[name].weight.std == pytest.approx(std, rel=1e-4)
    assert params["2.bias"].grad is None and params["2.bias"].update_ratio is None
    assert not torch.equal(model[0].weight, before["0.weight"]), "the optimizer did move the weight"


def test_gradient_accumulation_measures_the_weight_once_and_the_summed_gradient() -> None:
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(6, 4) for _ in range(3)]
    with actdiag.watch(model, every=1) as mon:
        w0 = model.weight.detach().clone()
        for x in xs:
            model(x).pow(2).sum().backward()
        g = model.weight.grad.detach().clone()
        opt.step()
        opt.zero_grad()
        mon.step()
    p = {s.name: s for s in mon.latest.params}["weight"]
    assert p.weight.mean == pytest.approx(reference_stats(w0)[0], rel=1e-5, abs=1e-7)
    assert p.grad is not None
    assert p.grad.mean == pytest.approx(reference_stats(g)[0], rel=1e-5, abs=1e-7)
    assert p.grad.std == pytest.approx(reference_stats(g)[1], rel=1e-4)


def test_sampled_update_ratio_agrees_with_the_exact_one() -> None:
    torch.manual_seed(3)
    model = nn.Linear(400, 300)  # 120000 weights: above the sample cap below, so the ratio is sampled
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(32, 400)
    with actdiag.watch(model, every=1, sample_cap=20000) as mon:
        w0 = model.weight.detach().clone()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        mon.step()
    exact = ((model.weight.detach() - w0).norm() / w0.norm()).item()
    got = {s.name: s for s in mon.latest.params}["weight"].update_ratio
    assert got is not None
    # Adam moves every element by about lr, so a 20000-element sample pins the ratio to well under 2%.
    assert got == pytest.approx(exact, rel=0.02)
    assert np.isfinite(got)


class MixedParams(nn.Module):
    """A float32 layer over the sample cap used below, a float64 layer under it, a frozen weight and a parameter the
    forward pass never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(300, 40)  # 12000 weights: sampled
        self.small = nn.Linear(40, 8, dtype=torch.float64)
        self.frozen = nn.Parameter(torch.randn(8), requires_grad=False)
        self.unused = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(self.big(x).double()) * self.frozen


class TwinSizes(nn.Module):
    """Weights of one size in three shapes (two of them alike): their update ratios are compared in one batch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6, bias=False)  # [6, 4]
        self.b = nn.Linear(4, 6, bias=False)  # [6, 4]
        self.flat = nn.Parameter(torch.randn(24))
        self.out = nn.Linear(6, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a(x) * self.b(x)) * self.flat


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "estimated"])
def test_update_ratios_of_weights_of_one_size_in_several_shapes(exact: bool) -> None:
    torch.manual_seed(2)
    model = TwinSizes()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, exact=exact)
    rec.begin(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    record = rec.end()
    assert record is not None
    got = {s.name: s.update_ratio for s in record.params}
    assert set(got) == set(before)
    for name, p in model.named_parameters():
        w0, w = before[name].reshape(-1).double(), p.detach().reshape(-1).double()
        assert got[name] == pytest.approx(((w - w0).norm() / w0.norm()).item(), rel=1e-9), name


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "estimated"])
@pytest.mark.parametrize("path", ["host", "device"])
def test_update_ratio_of_every_parameter_matches_a_float64_reference(path: str, exact: bool) -> None:
    """Exact statistics: the ratio over every element. Estimated ones (recording often): a large weight's ratio
    over its fixed sample, and said so (`update_ratio_estimated`); a small weight's is exact either way."""
    from actdiag.hooks.stats import _SAMPLES

    torch.manual_seed(5)
    model = MixedParams()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(16, 300)
    cap = 5000
    rec = Recorder(model, sample_cap=cap, path=path, exact=exact)  # path="device": the CUDA path's device ops
    rec.begin(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x).pow(2).mean().backward()
    opt.step()
    record = rec.end()
    assert record is not None
    got = {s.name: s.update_ratio for s in record.params}
    estimated = {s.name for s in record.params if s.update_ratio_estimated}
    assert got["frozen"] is None and got["unused"] is None  # no gradient: not updated, no ratio
    for name, p in model.named_parameters():
        if not p.requires_grad or name == "unused":
            continue
        w0, w = before[name].reshape(-1).double(), p.detach().reshape(-1).double()
        sampled = not exact and w.numel() > cap
        assert (name in estimated) == sampled, name
        if sampled:  # the ratio is defined on the fixed sample: the reference uses the same elements
            idx = _SAMPLES.get(w.numel(), cap, w.device)
            w0, w = w0[idx], w[idx]
        expected = ((w - w0).norm() / w0.norm()).item()
        assert got[name] == pytest.approx(expected, rel=1e-5 if path == "device" else 1e-9), name
        assert got[name] > 0


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_unit_activity_fast_count_matches_boolean_reference(dtype: torch.dtype, path: str) -> None:
    from actdiag.hooks.stats import unit_activity

    torch.manual_seed(5)
    # GELU outputs are negative as well as positive; 5000 samples per unit is past float16's exact integers (2048).
    y = torch.nn.functional.gelu(torch.randn(5000, 6) - 2.5).to(dtype)
    y[:, 0] = 0.0  # dead
    y[:, 1] = -0.1  # negative only: dead too
    y[:, 2] = 0.0
    y[:30, 2] = 1.0  # active in 30 of 5000 samples: rare (< 1%)
    ever = torch.zeros(6, dtype=torch.bool)
    dead, rare, never = unit_activity(y, 1, ever, 0.01, path=path).tolist()
    a = y.float().numpy()
    active = (a > 0).sum(axis=0)
    assert dead == int((active == 0).sum()) == 2
    assert rare == int((active < 0.01 * 5000).sum())
    assert never == 2
    assert ever.tolist() == list(active > 0)


@pytest.mark.parametrize("path", ["host", "device"])
def test_saturation_count_paths_agree_with_numpy(path: str) -> None:
    from actdiag.hooks.stats import saturation_count

    y = torch.tanh(torch.randn(3000) * 3)
    got = saturation_count(y, -1.0, 1.0, 0.01, path=path).item()
    a = y.numpy()
    assert got == int((np.abs(a) >= np.float32(0.99)).sum())


def test_a_backward_that_raises_leaves_the_retry_measuring_weights_before_the_update() -> None:
    """Small float32 weights and their gradients are copied together when a backward pass ends. One that raises
    never ends so; its retry in the same step must still take them, before the optimizer moves the weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(8, 4)
    with actdiag.watch(model, every=1) as mon:
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        h = model[1](model[0](x))
        raised: list[bool] = []

        def fail_once(grad: torch.Tensor) -> None:  # after the last layer's gradients, before the first's
            if not raised:
                raised.append(True)
                raise RuntimeError("a failing hook")

        h.register_hook(fail_once)
        loss = model[2](h).pow(2).sum()
        with pytest.raises(RuntimeError, match="a failing hook"):
            loss.backward(retain_graph=True)
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        mon.step()
    params = {p.name: p for p in mon.latest.params}
    for name, w in w0.items():
        assert params[name].weight.mean == pytest.approx(reference_stats(w)[0], rel=1e-6, abs=1e-9), name
        assert params[name].grad is not None
        assert params[name].grad.mean == pytest.approx(reference_stats(grads[name])[0], rel=1e-6, abs=1e-9), name
        assert params[name].grad.std == pytest.approx(reference_stats(grads[name])[1], rel=1e-5), name


def test_parameters_are_taken_together_only_on_the_host_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-of-backward copy of small weights is the host path's: with the device path chosen (even after the
    recorder was made, as bench/count_ops.py does), each weight and gradient takes that path's batch."""
    from actdiag.hooks.host import HostBatch

    taken: list[int] = []
    real = HostBatch.take_many

    def counting(self: HostBatch, keys: list[object], xs: list[torch.Tensor]) -> object:
        taken.append(len(xs))
        return real(self, keys, xs)

    monkeypatch.setattr(HostBatch, "take_many", counting)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    for path in (None, "device"):
        taken.clear()
        with actdiag.watch(model, every=1) as mon:
            mon.recorder.path = path
            model(x).pow(2).sum().backward()
            mon.step()
        params = {p.name: p for p in mon.latest.params}
        assert all(p.grad is not None for p in params.values())
        w = model[0].weight.detach().double()
        assert params["0.weight"].weight.mean == pytest.approx(w.mean().item(), rel=1e-6)
        if path is None:
            assert sum(taken) == 8  # four weights and their four gradients
        else:
            assert taken == []
        model.zero_grad(set_to_none=True)
