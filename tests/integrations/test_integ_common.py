"""The end-of-training summary both callbacks print."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import actdiag
from actdiag.integrations._common import check_every, summary
from actdiag.records import Finding, Fix


def _monitor() -> actdiag.Monitor:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with actdiag.watch(model, every=2) as monitor:
        for _ in range(3):
            model(torch.randn(4, 3)).sum().backward()
            monitor.step()
    return monitor


def test_integ_summary_lists_findings_in_order_with_fixes() -> None:
    monitor = _monitor()
    findings = (
        Finding("nonfinite", "error", "0", "NaN appears.", fixes=(Fix("check_inputs", "Check the inputs."),)),
        Finding("large_updates", "warning", None, "Updates are large.", fixes=()),
    )
    text = summary(monitor, findings, None)
    lines = text.splitlines()
    assert lines[0] == "actdiag: recorded 2 of 3 steps (every 2)"
    assert lines[1] == "actdiag: 2 finding(s), most severe first:"
    assert lines[2].split() == ["error", "0:", "nonfinite:", "NaN", "appears.", "[fix:", "check_inputs]"]
    assert "(model): large_updates: Updates are large." in lines[3] and "[fix" not in lines[3]


def test_integ_summary_without_findings_names_the_logdir() -> None:
    text = summary(_monitor(), (), Path("runs/x"))
    assert text.splitlines() == [
        "actdiag: recorded 2 of 3 steps (every 2); TensorBoard: runs/x",
        "actdiag: no findings",
    ]


def test_integ_summary_says_when_statistics_were_estimated() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
    for every, estimated in ((1, True), (10, False)):
        with actdiag.watch(model, every=every, sample_cap=100) as monitor:
            model(torch.randn(8, 64)).sum().backward()
            monitor.step()
        head = summary(monitor, (), None).splitlines()[0]
        assert ("estimated from a sample" in head) is estimated, head


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_integ_check_every_rejects_bad_intervals(bad: object) -> None:
    with pytest.raises(ValueError, match="every must be a positive integer"):
        check_every(bad)  # type: ignore[arg-type]
    assert check_every(7) == 7
