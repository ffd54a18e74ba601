"""Per-unit silence streaks and NaN/Inf counts of input gradients, against a numpy reference, on both paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from actdiag.hooks.recorder import Recorder
from actdiag.hooks.tracking import STREAK_BINS, UNIT_EXAMPLES, UnitStreaks


class Given(nn.Module):
    """Adds a per-step offset to its input, so that the test decides which units the ReLU after it lets through."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = torch.zeros(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.offset


def reference_streaks(masks: list[np.ndarray]) -> np.ndarray:
    streak = np.zeros(masks[0].shape, dtype=np.int64)
    for alive in masks:
        streak = np.where(alive, 0, streak + 1)
    return streak


@pytest.mark.parametrize("path", [None, "device"])
def test_streaks_match_a_numpy_reference(path: str | None) -> None:
    rng = np.random.default_rng(0)
    model = nn.Sequential(Given(), nn.ReLU())
    rec = Recorder(model, path=path)  # type: ignore[arg-type]
    masks: list[np.ndarray] = []
    steps = [0, 5, 10, 15, 20, 25, 30]
    for step in steps:
        # Each unit fires (offset +50) or stays silent (offset -50) for every sample of this step.
        alive = rng.random(6) < 0.4
        alive[0], alive[1] = False, step < 10  # unit 0 never fires; unit 1 dies after step 5
        model[0].offset = torch.tensor(np.where(alive, 50.0, -50.0), dtype=torch.float32)
        masks.append(alive)
        rec.begin(step)
        model(torch.randn(16, 6, requires_grad=True)).sum().backward()
        record = rec.end()
    assert record is not None
    act = next(layer for layer in record.layers if layer.type == "ReLU").activity
    assert act is not None
    streak = reference_streaks(masks)
    assert act.calls == len(steps)
    assert act.silent == tuple(np.bincount(np.minimum(streak, STREAK_BINS - 1), minlength=len(steps) + 1).tolist())
    assert act.never == int((~np.any(masks, axis=0)).sum())
    for s, since in enumerate(act.since):
        if 0 < s <= len(steps):
            assert since == steps[-s]
    # the longest-silent units first, ties by index
    order = sorted(range(6), key=lambda i: (-streak[i], i))[:UNIT_EXAMPLES]
    assert act.examples == tuple((i, int(streak[i])) for i in order if streak[i] > 0)
    assert act.examples[0] == (0, len(steps))
    assert (1, len(steps) - 2) in act.examples


class Poison(nn.Module):
    """Identity forward; the gradient it passes back has NaN in `bad` elements."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Poison.apply(x, self.bad)  # type: ignore[no-any-return]


class _Poison(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bad: int) -> torch.Tensor:  # noqa: ANN001
        ctx.bad = bad
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        out = grad.clone()
        out.view(-1)[: ctx.bad] = float("nan")
        return out, None


@pytest.mark.parametrize("path", [None, "device"])
@pytest.mark.parametrize("aliased", [True, False])
def test_input_gradient_nonfinite_counts(path: str | None, aliased: bool) -> None:
    """The input gradient of `poison` holds 7 NaN: read from the layer before (its output is poison's input) or,
    with a function in between, from a hook of its own."""
    lin = nn.Linear(4, 5)
    poison = Poison(7)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.poison, self.head = lin, poison, nn.Linear(5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return self.head(self.poison(h if aliased else h * 2))

    x = torch.randn(8, 4)
    x[0, 1] = float("inf")
    rec = Recorder(Net(), path=path)  # type: ignore[arg-type]
    rec.begin(0)
    rec.model(x).sum().backward()
    record = rec.end()
    assert record is not None
    by = {layer.name: layer for layer in record.layers}
    assert by["poison"].input_grad_nonfinite == 7
    assert by["head"].input_grad_nonfinite == 0
    assert by["lin"].input_nonfinite == 1  # the step's first input
    assert by["poison"].input_nonfinite is None


def test_batched_summaries_match_the_per_call_summary() -> None:
    # end() summarises a step's CPU streaks together in numpy; each must equal the per-call summary (device ops):
    # the same streak histogram and the same longest-silent units, ties to the lowest index.
    streaks = UnitStreaks()
    g = torch.Generator().manual_seed(0)
    calls = []
    for i, (units, high) in enumerate([(5, 3), (64, 80), (64, 3), (3, 80), (64, 2), (100, 70)]):
        s = streaks.streak_for("relu", i, units, torch.device("cpu"), 0)
        s.copy_(torch.randint(0, high, (units,), generator=g, dtype=torch.int32))
        calls.append(("relu", i))
    got = streaks.summaries(calls)
    assert len(got) == len(calls)
    for call, vec in zip(calls, got, strict=True):
        ref = streaks.summary(*call).numpy()
        assert vec.dtype == np.float64
        np.testing.assert_array_equal(np.asarray(vec), ref)


class ManyShapes(nn.Module):
    """ReLU outputs of several shapes, two of each (counted together when the step ends), one in place and then
    modified, one too large for the host batch."""

    def __init__(self) -> None:
        super().__init__()
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(6))
        self.inplace = nn.ReLU(inplace=True)
        self.big = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(8, 48) - 0.3
        seq = x.reshape(4, 6, 16) - 0.1
        img = x.reshape(2, 3, 8, 8)
        outs = [self.acts[0](flat), self.acts[1](flat * 2), self.acts[2](seq), self.acts[3](seq - 1)]
        outs += [self.acts[4](img), self.acts[5](-img)]
        h = self.inplace(flat.detach() + 0.5)
        h *= -1  # after the ReLU has been measured: the units are counted on what it returned
        big = self.big(torch.randn(200, 64) - 2.5)
        return sum(o.sum() for o in outs) + h.sum() + big.sum()


def reference_units(y: np.ndarray, unit_dim: int, rare_below: float) -> tuple[int, int]:
    active = (np.moveaxis(y, unit_dim, 0).reshape(y.shape[unit_dim], -1) > 0).sum(axis=1)
    samples = y.size // y.shape[unit_dim]
    return int((active == 0).sum()), int((active < rare_below * samples).sum())


def test_unit_counts_of_many_outputs_match_a_reference() -> None:
    from actdiag.hooks.modules import RARE_ACTIVE_BELOW

    torch.manual_seed(3)
    model = ManyShapes()
    seen: dict[str, np.ndarray] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o.detach().double().numpy()))
    records = []
    for path in (None, "device"):
        rec = Recorder(model, path=path)  # type: ignore[arg-type]
        rec.begin(0)
        model(torch.randn(384, requires_grad=True)).backward()
        record = rec.end()
        assert record is not None
        records.append(record)
        relus = [layer for layer in record.layers if layer.type == "ReLU"]
        assert len(relus) == 8
        for layer in relus:
            y = seen[layer.name]  # this run's output
            udim = 1 if y.ndim in (2, 4) else y.ndim - 1
            dead, rare = reference_units(y, udim, RARE_ACTIVE_BELOW)
            units = y.shape[udim]
            assert layer.units == units
            assert layer.dead_fraction == dead / units, layer.name
            assert layer.rare_fraction == rare / units, layer.name
            assert layer.never_active_fraction == dead / units, layer.name  # one recorded step: never == dead
    assert any(layer.dead_fraction for layer in records[0].layers if layer.type == "ReLU")
