"""A real long watched run: memory (RSS, Python objects, live tensors) and report size over N steps, every=1.

    PYTHONPATH=. python bench/rel_longrun.py [STEPS]      (default 100000)

Prints one line per checkpoint. Not a test: it takes minutes.
"""

from __future__ import annotations

import gc
import sys
import time

import torch
from torch import nn

import actdiag
from actdiag.reports.json import dumps


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # Small on purpose: the cost of a step is the statistics of each tensor, and this measures what accumulates.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 4), torch.randn(32, 8)
    marks = {1_000, 10_000, 25_000, 50_000, 75_000, steps}
    t0 = time.perf_counter()
    with actdiag.watch(model, every=1) as monitor:
        for i in range(1, steps + 1):
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
            if i in marks:
                gc.collect()
                tensors = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
                size = len(dumps(monitor.report()))
                hist = monitor.history
                print(
                    f"step {i:>7}  rss {rss_mib():7.1f} MiB  gc objects {len(gc.get_objects()):>7}  "
                    f"tensors {tensors:>4}  history points {len(hist.steps):>4} (hist {len(hist.hist_steps):>3})  "
                    f"report {size / 1024:7.1f} KiB  {(time.perf_counter() - t0) / i * 1e3:6.2f} ms/step",
                    flush=True,
                )


if __name__ == "__main__":
    main()
