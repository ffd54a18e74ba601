"""A recorded step's records are built when first read (`decode.decode_step`): reading them late gives what reading
them at once gives, and the scalars the history and the NaN check take from the step's arrays are the records'."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

import actdiag
from actdiag.metrics import LAYER_METRICS, PARAM_METRICS, step_scalars
from actdiag.records import StepRecord, pending_scalars
from actdiag.rules.run import any_nonfinite


class Mixed(nn.Module):
    """ReLU units (streaks, dead counts), a saturating tanh, a Linear called twice (labels `#1`), a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.relu = nn.ReLU()
        self.shared = nn.Linear(16, 16)
        self.tanh = nn.Tanh()
        self.head = nn.Linear(16, 3)
        self.head.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.inp(x) - 0.5)
        h = self.tanh(4 * self.shared(self.shared(h)))
        return self.head(h)


def _run(read_at_once: bool, steps: int = 6, nan_at: int | None = None) -> tuple[list[StepRecord], list[object]]:
    """Train `Mixed` for `steps` steps under watch(every=1); the records of every step, read as soon as the step
    ends or only at the end, and the scalars their steps had before anything read them."""
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    records: list[StepRecord] = []
    pending: list[object] = []
    with actdiag.watch(model, every=1) as mon:
        for step in range(steps):
            x = torch.randn(32, 8)
            if step == nan_at:
                x[3, 2] = float("nan")
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            mon.step()
            assert mon.latest is not None
            records.append(mon.latest)
            pending.append(pending_scalars(mon.latest))
            if read_at_once:
                assert mon.latest.layers and mon.latest.params
    return records, pending


def test_records_read_late_equal_records_read_at_once() -> None:
    """Nothing a record is built from changes after its step: unit streaks, weight copies and the host batch's
    buffers move on with every recorded step, and a record read several steps later still holds its own step."""
    early, _ = _run(read_at_once=True)
    late, pending = _run(read_at_once=False)
    assert all(p is not None for p in pending)  # the monitor itself read none of them
    assert [r.step for r in late] == [r.step for r in early]
    for a, b in zip(early, late, strict=True):
        assert a == b
    # streaks grew between steps: a record built late from the tracks as they are at the end would differ
    silent = [lay.activity.silent for lay in late[-1].layers if lay.activity is not None]
    assert silent and [lay.activity.calls for lay in early[1].layers if lay.activity is not None] == [2]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


@pytest.mark.parametrize("nan_at", [None, 3])
def test_scalars_from_the_arrays_are_the_records_own(nan_at: int | None) -> None:
    """The history's series and the NaN check read a step's arrays while its records are unbuilt; once built,
    `step_scalars` computes them from the records (`metrics.layer_metrics`): bit for bit the same."""
    records, pending = _run(read_at_once=False, nan_at=nan_at)
    # The first step with a NaN, and only that one, the monitor read for its `nonfinite` finding.
    assert [i for i, sc in enumerate(pending) if sc is None] == ([] if nan_at is None else [nan_at])
    for record, sc in zip(records, pending, strict=True):
        if sc is None:
            continue
        assert any_nonfinite(record) == sc.nonfinite == (nan_at is not None and record.step >= nan_at)  # type: ignore[attr-defined]
        built = step_scalars(record) if record.layers else None  # reading the layers builds the record
        assert pending_scalars(record) is None and built is not None
        assert built.labels == sc.labels and built.names == sc.names  # type: ignore[attr-defined]
        assert "shared#1" in built.labels
        assert built.layers.shape == (len(record.layers), len(LAYER_METRICS))
        assert built.params.shape == (len(record.params), len(PARAM_METRICS))
        assert _same(built.layers, sc.layers) and _same(built.params, sc.params)  # type: ignore[attr-defined]
        assert built.nonfinite == any_nonfinite(record) == (nan_at is not None and record.step >= nan_at)


def test_one_record_built_once_when_two_threads_read_it() -> None:
    records, _ = _run(read_at_once=False, steps=2)
    record = records[-1]
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(record.layers)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 4 and all(s is record.layers for s in seen)
