"""Long runs: with every=1, memory and report size stay bounded however many steps a run has."""

from __future__ import annotations

import gc
import json
import weakref
from dataclasses import replace

import torch
from torch import nn

import actdiag
from actdiag.history import HistoryBuffer, _Series
from actdiag.hooks import stats as stats_mod
from actdiag.hooks.recorder import Recorder
from actdiag.records import StepRecord


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


def _one_record() -> StepRecord:
    model = _tiny()
    with actdiag.watch(model, every=1) as monitor:
        model(torch.randn(16, 4)).pow(2).mean().backward()
        monitor.step()
    assert monitor.latest is not None
    return monitor.latest


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_rel_series_of_100k_steps_is_bounded_and_evenly_spread() -> None:
    series = _Series(256)
    for step in range(100_000):
        series.offer(step, {"v": float(step)})
        assert len(series.steps) < 256
    assert series.steps[0] == 0 and series.steps[-1] > 100_000 - series.stride
    gaps = {b - a for a, b in zip(series.steps, series.steps[1:])}
    assert gaps == {series.stride}  # evenly spread over the whole run
    assert [r["v"] for r in series.rows] == [float(s) for s in series.steps]


def test_rel_history_buffer_stays_within_its_caps() -> None:
    record = _one_record()
    buf = HistoryBuffer(max_points=64, max_hist=8)
    for step in range(20_000):
        buf.add(replace(record, step=step))
    hist = buf.snapshot()
    assert 32 <= len(hist.steps) < 64 and 4 <= len(hist.hist_steps) < 8
    assert hist.steps[-1] > 20_000 - buf.scalars.stride
    assert all(len(series) == len(hist.steps) for m in hist.layers.values() for series in m.values())
    assert all(len(h) == len(hist.hist_steps) for h in hist.activation_histograms.values())


def test_rel_report_size_is_bounded_by_a_full_history() -> None:
    from actdiag.reports.json import dumps

    record = _one_record()

    def size(steps: int, offset: int) -> int:
        monitor = actdiag.watch(_tiny(), every=1, max_history=64)
        for step in range(steps):  # what Monitor does with each recorded step, without the model
            monitor.history_buffer.add(replace(record, step=offset + step))
        monitor.latest = replace(record, step=offset + steps - 1)
        monitor.steps = monitor.recorded_steps = steps
        doc = dumps(monitor.report())
        json.loads(doc)
        return len(doc)

    # The largest a report gets: both series one point short of thinning (64 - 1 scalar rows; the histogram
    # series fills first, at 64, and thins to 32). Step numbers get as many digits as in the long runs.
    full = size(63, 100_000)
    for steps in (1_000, 5_000, 20_000):
        assert size(steps, 100_000 - steps) <= full


def test_rel_real_run_every_step_holds_no_growing_state() -> None:
    """A real watched run: besides the bounded history and the latest record, nothing accumulates, neither
    Python objects nor tensors nor internal caches."""
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 4)
    with actdiag.watch(model, every=1) as monitor:

        def train(n: int) -> tuple[int, int]:
            for _ in range(n):
                model(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                monitor.step()
            # drop what is bounded by design, then count what is left
            monitor.history_buffer = HistoryBuffer(max_points=16, max_hist=4)
            monitor.latest = None
            monitor._findings_cache = None
            gc.collect()
            return len(gc.get_objects()), _live_tensors()

        objects_before, tensors_before = train(20)
        objects_after, tensors_after = train(80)
        rec = monitor.recorder
        assert rec.recording and all(k[0] == "P" for k in rec._pending)  # only the weights of the step begun
        assert len(rec._ever_active) == 1  # one ReLU call
        assert len(stats_mod._SAMPLES._cache) <= stats_mod._SAMPLES._max
    assert monitor.recorded_steps == 100
    assert tensors_after <= tensors_before
    assert objects_after - objects_before < 50, f"{objects_after - objects_before} objects accumulated"


def test_rel_history_keeps_histograms_without_their_steps_arrays() -> None:
    """A decoded step's histograms keep their counts in the step's arrays until read (records._Counts). The ones the
    history keeps are read when kept, so a long run holds tuples, not one array per kept step; steps it does not
    keep leave nothing behind."""
    buf = HistoryBuffer(max_points=64, max_hist=4)  # its histogram series ends with steps 0 and 2 of 0..3
    refs = []
    expected = {}
    model = _tiny()
    rec = Recorder(model)
    for step in range(4):
        rec.begin(step)
        model(torch.randn(16, 4)).pow(2).mean().backward()
        record = rec.end()
        assert record is not None
        act = record.layers[0].activation
        assert act is not None and act.exponents._block is not None  # deferred until read
        refs.append(weakref.ref(act.exponents._block))
        counts = act.exponents.counts  # read here: from now on the same values, as tuples
        expected[step] = (act.histogram.edges, act.histogram.counts, counts)
        buf.add(record)
        del record, act
        gc.collect()
        assert refs[-1]() is None, f"step {step}: the step's arrays outlived its record"
    hist = buf.snapshot()
    label = next(iter(hist.activation_histograms))
    kept = [h for h in hist.activation_histograms[label] if h is not None]
    assert hist.hist_steps == (0, 2) and len(kept) == 2 and all(h._block is None for h in kept)
    for i, step in enumerate(hist.hist_steps):
        h, e = hist.activation_histograms[label][i], hist.activation_exponents[label][i]
        assert h is not None and e is not None
        assert (h.edges, h.counts, e.counts) == expected[step]
