"""What a recorded step leaves for Python's cyclic garbage collector.

A process with torch imported holds a few hundred thousand tracked objects, and a full collection walks all of
them; one runs whenever the objects promoted to the oldest generation exceed a quarter of the long-lived ones.
Every tracked object a recorded step leaves alive brings the next full collection closer, so a record keeps its
histograms as arrays (not tracked) and the history keeps numbers and arrays, not histogram objects.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actdiag
from actdiag.history import HistoryBuffer
from actdiag.records import ExponentHistogram, Histogram, StepRecord, measured_stats

DEPTH = 20  # x (Linear + ReLU): many small tensors, as the deep narrow benchmark model


@contextmanager
def _new_survivors() -> Iterator[list[object]]:
    """The tracked objects created in the block that are alive after it (with their types counted by the caller):
    everything older is frozen out of the collector's view first."""
    found: list[object] = []
    gc.collect()
    gc.freeze()
    try:
        yield found
        gc.collect()
        found.extend(gc.get_objects())  # the frozen generation is not listed
    finally:
        gc.unfreeze()


def _deep() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(DEPTH):
        layers += [nn.Linear(8, 8), nn.ReLU()]
    model = nn.Sequential(*layers)
    return model, torch.optim.SGD(model.parameters(), lr=1e-3), torch.randn(4, 8), torch.randn(4, 8)


def test_rel_recorded_step_leaves_few_tracked_objects_per_tensor() -> None:
    """Beyond the records themselves (one per measured tensor, layer call and parameter), a recorded step leaves
    no histogram object alive: the record builds them when read, the history keeps them packed."""
    model, opt, x, target = _deep()
    with actdiag.watch(model, every=1) as monitor:

        def step() -> None:
            opt.zero_grad()
            F.mse_loss(model(x), target).backward()
            opt.step()
            monitor.step()

        for _ in range(3):  # past the first steps' one-time set-up
            step()
        with _new_survivors() as survivors:
            step()
        record = monitor.latest
        assert record is not None and record.step == 3 and monitor.history.hist_steps[-1] == 3  # kept by both
        tensors = len(measured_stats(record.layers, record.params))
        assert tensors == 8 * DEPTH  # each layer call's output and its gradient, each parameter and its gradient
        by_type = Counter(type(o) for o in survivors)
        assert by_type[Histogram] == by_type[ExponentHistogram] == 0, by_type
        kinds = {"TensorStats", "LayerStats", "ParamStats", "UnitActivity", "StepRecord", "LostUpdates"}
        records = sum(n for t, n in by_type.items() if t.__module__ == "actdiag.records" and t.__name__ in kinds)
        # One TensorStats per measured tensor, a LayerStats per layer call (half as many), a ParamStats per
        # parameter (half as many), a UnitActivity per ReLU call, the StepRecord.
        assert records <= 1.7 * tensors + 1, by_type
        # Everything the step left, the hooks' bookkeeping and the user's new gradients included.
        assert len(survivors) <= 8 * tensors, by_type.most_common(8)


def test_rel_history_keeps_no_tracked_object_per_layer() -> None:
    """A history row keeps numbers and row copies, which the collector stops tracking: adding a step leaves a
    fixed number of tracked objects, whatever the number of layers, and the snapshot still has every histogram."""
    model, opt, x, target = _deep()
    with actdiag.watch(model, every=1) as monitor:
        F.mse_loss(model(x), target).backward()
        monitor.step()
    record = monitor.latest
    assert isinstance(record, StepRecord) and len(record.layers) == 2 * DEPTH
    buf = HistoryBuffer()
    with _new_survivors() as survivors:
        buf.add(record)
    assert len(survivors) <= 4, Counter(type(o).__name__ for o in survivors)
    hist = buf.snapshot()
    for layer in record.layers:
        a, g = layer.activation, layer.gradient
        assert a is not None and g is not None
        assert hist.activation_histograms[layer.label] == (a.histogram,)
        assert hist.activation_exponents[layer.label] == (a.exponents,)
        assert hist.gradient_exponents[layer.label] == (g.exponents,)


def test_collector_is_paused_only_while_a_recorded_step_finishes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Automatic collection is off while actdiag finishes a recorded step (its own work), on again afterwards,
    after an error inside that work too, and left off when the user had switched it off."""
    import actdiag.monitor as monitor_mod

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    seen: list[bool] = []
    real_end = monitor_mod.Recorder.end

    def end(self: object, *args: object) -> object:
        seen.append(gc.isenabled())
        return real_end(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(monitor_mod.Recorder, "end", end)
    assert gc.isenabled()
    with actdiag.watch(model, every=1) as mon:
        model(torch.randn(3, 4)).sum().backward()
        mon.step()
        assert seen == [False] and gc.isenabled()
        gc.disable()
        try:
            model(torch.randn(3, 4)).sum().backward()
            mon.step()
            assert seen == [False, False] and not gc.isenabled()  # the user's choice is kept
        finally:
            gc.enable()

    def broken(self: object, *args: object) -> None:
        raise RuntimeError("decode bug")

    monkeypatch.setattr(monitor_mod.Recorder, "end", broken)
    with pytest.warns(RuntimeWarning, match="decode bug"), actdiag.watch(model, every=1) as mon:
        model(torch.randn(3, 4)).sum().backward()
        mon.step()
    assert gc.isenabled()
