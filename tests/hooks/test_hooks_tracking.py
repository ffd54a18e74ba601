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
