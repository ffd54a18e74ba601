"""Cost of the report sinks on a 200-layer model (CPU): what the training loop pays per recorded step for TensorBoard
(on_record hands the step to the writer thread) against writing it synchronously, and the HTML report's render time
and size.

    python bench/bench_reports.py [--layers 200] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import actdiag  # noqa: E402
from actdiag.reports.tensorboard import TensorBoardSink  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(64, 64), nn.ReLU() if i % 2 else nn.Tanh()) for i in range(args.layers // 2)]
    model = nn.Sequential(*blocks)
    x = torch.randn(32, 64)
    records = []
    with actdiag.watch(model, every=1) as monitor:
        for _ in range(args.steps):
            model(x).sum().backward()
            monitor.step()
            assert monitor.latest is not None
            records.append(monitor.latest)
    n_layers = len(records[0].layers)

    with tempfile.TemporaryDirectory() as tmp:
        sink = TensorBoardSink(Path(tmp) / "async")
        handoff = []
        for r in records:
            t = time.perf_counter()
            sink.on_record(r)
            handoff.append(time.perf_counter() - t)
        sink.on_close(monitor.report())

        sync = TensorBoardSink(Path(tmp) / "sync")
        direct = []
        for r in records:
            t = time.perf_counter()
            sync._write_record(r)  # what on_record would cost if it wrote on the training thread
            direct.append(time.perf_counter() - t)
        sync.on_close(monitor.report())
        ev = sum(f.stat().st_size for f in (Path(tmp) / "async").glob("events.*"))

        t = time.perf_counter()
        path = monitor.report().save_html(Path(tmp) / "report.html")
        render = time.perf_counter() - t
        size = os.path.getsize(path)
        one = actdiag.inspect(model, x).save_html(Path(tmp) / "inspect.html")
        one_size = os.path.getsize(one)

    print(f"{n_layers} layers, {args.steps} recorded steps, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"TensorBoard on_record (training thread): median {statistics.median(handoff) * 1e6:.0f} us/step")
    print(f"TensorBoard write if synchronous:        median {statistics.median(direct) * 1e3:.1f} ms/step")
    print(f"TensorBoard event file: {ev / 1e3:.0f} kB for {args.steps} steps")
    print(f"HTML report of the watch run: {size / 1e3:.0f} kB, rendered in {render:.1f} s")
    print(f"HTML report of actdiag.inspect (one step): {one_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
