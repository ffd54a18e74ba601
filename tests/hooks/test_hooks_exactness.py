"""The exactness policy (CONTRACT.md, "Exactness"; issue 20): count, mean, min, max, abs_max and the non-finite count
are exact at every interval, on the host and the device paths; recording more often than EXACT_FROM_EVERY, only
std, zero_fraction, the histograms and update ratios may come from a tensor's sample (a large tensor's, and on the
host path a small tensor's over SMALL_SAMPLE elements), and each record names the fields that did."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import actdiag
from actdiag.monitor import EXACT_FROM_EVERY

ESTIMATED = ["std", "zero_fraction", "histogram"]


class WideNet(nn.Module):
    """Activations, gradients and one weight over the sample cap, a small head under it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(96, 128)
        self.act = nn.Tanh()
        self.head = nn.Linear(128, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc(x)))


def _reference(t: torch.Tensor) -> dict[str, float]:
    a = t.detach().to(torch.float64).numpy().ravel()
    fin = a[np.isfinite(a)]
    return {
        "count": fin.size,
        "nonfinite": a.size - fin.size,
        "mean": float(fin.mean()),
        "min": float(fin.min()),
        "max": float(fin.max()),
        "abs_max": float(np.abs(fin).max()),
        "std": float(fin.std()),
    }


def _record(every: int, path: str, x: torch.Tensor) -> tuple[actdiag.Monitor, WideNet, torch.Tensor, torch.Tensor]:
    """One recorded training step of WideNet on `x`: the monitor, the model, fc's output and fc's weight before
    the optimizer step."""
    torch.manual_seed(0)
    model = WideNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: dict[str, torch.Tensor] = {}
    model.fc.register_forward_hook(lambda m, i, out: seen.__setitem__("fc", out.detach().clone()))
    w_before = model.fc.weight.detach().clone()
    with actdiag.watch(model, every=every) as mon:
        mon.recorder.path = path  # "device": the CUDA path's code, run on the CPU
        model(x).nan_to_num().pow(2).mean().backward()
        opt.step()
        mon.step()
    return mon, model, seen["fc"], w_before


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("every", [1, 50])
def test_extremes_are_exact_at_every_interval_and_estimates_are_named(every: int, path: str) -> None:
    x = torch.randn(200, 96) * 3  # 200 x 128 = 25600 outputs: over the sample of 4096 / 8192
    mon, model, out, w_before = _record(every, path, x)
    layer = mon.latest.layers[0]
    got, ref = layer.activation, _reference(out)
    assert got.numel > mon.recorder.sample_cap
    # Exact at every interval, from every element, against the float64 reference.
    assert (got.count, got.nonfinite_count) == (ref["count"], ref["nonfinite"])
    assert (got.min, got.max, got.abs_max) == (ref["min"], ref["max"], ref["abs_max"])
    assert got.mean == pytest.approx(ref["mean"], rel=1e-6, abs=1e-7)
    # Only the spread, zeros and histograms may be estimated, and they say so.
    weight = layer.weight
    assert weight is not None and weight.numel > mon.recorder.sample_cap
    if every < EXACT_FROM_EVERY:
        assert list(got.estimated) == ESTIMATED and list(weight.estimated) == ESTIMATED
        assert got.std == pytest.approx(ref["std"], rel=0.05)
    else:
        assert got.estimated == () and weight.estimated == ()
        assert got.std == pytest.approx(ref["std"], rel=1e-5)
    # The head's tensors are under the sample: exact whatever the interval.
    assert mon.latest.layers[2].activation.estimated == ()
    # The update ratio follows the same rule: over every element when exact, marked when from the sample.
    w0, w1 = w_before.double().reshape(-1), model.fc.weight.detach().double().reshape(-1)
    exact_ratio = ((w1 - w0).norm() / w0.norm()).item()
    assert layer.update_ratio_estimated is (every < EXACT_FROM_EVERY)
    if every >= EXACT_FROM_EVERY:
        assert layer.update_ratio == pytest.approx(exact_ratio, rel=1e-5 if path == "device" else 1e-9)
    else:
        assert layer.update_ratio == pytest.approx(exact_ratio, rel=0.1)
    assert mon.latest.layers[2].update_ratio_estimated is False


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("every", [1, 50])
def test_nonfinite_values_leave_the_exact_fields_exact(every: int, path: str) -> None:
    x = torch.randn(200, 96) * 3
    x[5, 7] = math.nan  # poisons one output row (its 128 outputs)
    mon, _, out, _ = _record(every, path, x)
    got, ref = mon.latest.layers[0].activation, _reference(out)
    assert ref["nonfinite"] == 128
    assert (got.count, got.nonfinite_count) == (ref["count"], ref["nonfinite"])
    assert (got.min, got.max, got.abs_max) == (ref["min"], ref["max"], ref["abs_max"])
    assert got.mean == pytest.approx(ref["mean"], rel=1e-6, abs=1e-7)


def test_json_names_the_estimated_fields(tmp_path: object) -> None:
    import json
    from pathlib import Path

    torch.manual_seed(0)
    model = WideNet()
    x = torch.randn(200, 96)
    docs = {}
    for every in (1, 50):
        with actdiag.watch(model, every=every) as mon:
            model(x).pow(2).mean().backward()
            mon.step()
        docs[every] = json.loads(mon.save_json(Path(str(tmp_path)) / f"r{every}.json").read_text())
    assert docs[1]["layers"][0]["activation"]["estimated"] == ESTIMATED
    assert docs[1]["layers"][2]["activation"]["estimated"] == []
    assert docs[50]["layers"][0]["activation"]["estimated"] == []
    # No optimizer step was taken here, but the ratio's estimate is named where a ratio is shown at all.
    for layer in docs[50]["layers"]:
        assert "estimated" not in layer


def test_accuracy_is_a_named_option() -> None:
    model = WideNet()
    x = torch.randn(200, 96)
    for every, accuracy, estimated in ((1, "exact", False), (50, "estimated", True), (1, "auto", True)):
        with actdiag.watch(model, every=every, accuracy=accuracy) as mon:
            model(x).sum().backward()
            mon.step()
        assert bool(mon.latest.layers[0].activation.estimated) is estimated, (every, accuracy)
    with pytest.raises(ValueError, match="accuracy must be one of 'auto', 'exact', 'estimated', got 'fast'"):
        actdiag.watch(model, accuracy="fast")  # type: ignore[arg-type]


@pytest.mark.parametrize("every", [1, 50])
def test_small_tensors_over_the_small_sample_follow_the_same_rule(every: int) -> None:
    """A small tensor (under the sample cap, measured with the step's others in numpy) of more than SMALL_SAMPLE
    elements: estimated fields named and close, exact ones exact, recording often; all exact at the default."""
    from actdiag.hooks.sampling import SMALL_SAMPLE

    x = torch.randn(24, 96) * 3  # fc's output: 24 x 128 = 3072 elements
    mon, _, out, _ = _record(every, "host", x)
    got, ref = mon.latest.layers[0].activation, _reference(out)
    assert SMALL_SAMPLE < got.numel <= mon.recorder.sample_cap
    assert (got.count, got.min, got.max, got.abs_max) == (ref["count"], ref["min"], ref["max"], ref["abs_max"])
    assert got.mean == pytest.approx(ref["mean"], rel=1e-6, abs=1e-7)
    if every < EXACT_FROM_EVERY:
        from actdiag.hooks.sampling import _SAMPLES

        assert list(got.estimated) == ESTIMATED and got.histogram.total == SMALL_SAMPLE
        sample = out.double().reshape(-1).numpy()[_SAMPLES.get_numpy(out.numel(), SMALL_SAMPLE)]
        assert got.std == pytest.approx(np.sqrt(((sample - got.mean) ** 2).mean()), rel=1e-5)
        assert got.std == pytest.approx(ref["std"], rel=0.1)  # 1024 of 3072 elements
    else:
        assert got.estimated == () and got.histogram.total == got.numel
        assert got.std == pytest.approx(ref["std"], rel=1e-5)
