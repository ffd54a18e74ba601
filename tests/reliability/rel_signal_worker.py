"""A watched training loop that runs until it is signalled: `python rel_signal_worker.py OUTDIR [slow]`.

Used by tests/reliability/test_rel_signals.py. It writes OUTDIR/ready after 5 steps and keeps training; the test
then sends SIGTERM or SIGINT and checks that what was recorded reached the disk.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import actdiag
from actdiag.records import Report, StepRecord


class EventsSink:
    """Writes one TensorBoard scalar per recorded step and flushes only when the watch closes (on_close)."""

    def __init__(self, logdir: Path) -> None:
        self.writer = SummaryWriter(str(logdir), flush_secs=3600, max_queue=100000)

    def on_record(self, record: StepRecord) -> None:
        self.writer.add_scalar("act_std/0", record.layers[0].activation.std, record.step)

    def on_close(self, report: Report) -> None:
        self.writer.close()


class SlowSink:
    """From step 5 on, each on_record takes a while and leaves a trace of starting and finishing: a signal that
    arrives meanwhile must wait until the write is done."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_record(self, record: StepRecord) -> None:
        if record.step < 5:
            return
        (self.out / f"began_{record.step}").write_text("")
        # Step 6 is where the test signals: a long write there leaves a loaded machine time to notice and send.
        time.sleep(5.0 if record.step == 6 else 0.5)
        (self.out / f"finished_{record.step}").write_text("")

    def on_close(self, report: Report) -> None:
        (self.out / "closed").write_text("")


def main() -> None:
    out = Path(sys.argv[1])
    slow = len(sys.argv) > 2 and sys.argv[2] == "slow"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    kwargs = {}
    if importlib.util.find_spec("actdiag.reports.tensorboard") is not None:
        kwargs["logdir"] = out / "tb_actdiag"
    sinks: list[object] = [EventsSink(out / "tb")] + ([SlowSink(out)] if slow else [])
    with actdiag.watch(model, every=1, report_json=out / "report.json", sinks=sinks, **kwargs) as monitor:
        while True:
            model(torch.randn(4, 6)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
            if monitor.steps == 5:
                (out / "ready").write_text("5")


if __name__ == "__main__":
    main()
