"""Cost of merging a recorded step across 2 gloo ranks on the CPU: time spent in monitor.step() per recorded step,
with and without torch.distributed, for a 20-layer MLP.

    PYTHONPATH=. python bench/rel_ddp_merge.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS = 20


def build() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(10):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers)


def run(model: nn.Module, x: torch.Tensor) -> tuple[float, int]:
    import actdiag

    spent = 0.0
    with actdiag.watch(model, every=1) as monitor:
        for _ in range(STEPS + 2):
            model(x).pow(2).mean().backward()
            model.zero_grad()
            t = time.perf_counter()
            monitor.step()
            if monitor.steps > 2:  # skip the first steps (capacity agreement, warm-up)
                spent += time.perf_counter() - t
        merger = monitor.recorder.merger
    return spent / STEPS * 1e3, merger.collectives if merger else 0


def worker(rank: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = nn.parallel.DistributedDataParallel(build())
    ms, coll = run(model, torch.randn(32, 256))
    if rank == 0:
        payload = monitor_payload_kib()
        print(
            f"2 gloo ranks: monitor.step() {ms:.2f} ms per recorded step, {coll} collectives for {STEPS + 2} "
            f"recorded steps, payload {payload:.0f} KiB per rank",
            flush=True,
        )
    dist.destroy_process_group()


def monitor_payload_kib() -> float:
    from actdiag.hooks.layout import STATS
    from actdiag.hooks.stats import DEFAULT_BINS

    n_stats = 20 * 2 + 20 * 2  # 20 layers (activation, gradient) + 20 parameters (weight, gradient)
    return (n_stats * STATS.length(DEFAULT_BINS) + 10 * 2 * 256) * 8 / 1024


def main() -> None:
    torch.set_num_threads(1)
    ms, _ = run(build(), torch.randn(64, 256))
    print(f"1 process:    monitor.step() {ms:.2f} ms per recorded step", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(f"file://{os.path.join(tmp, 'rdzv')}",), nprocs=2)


if __name__ == "__main__":
    sys.exit(main())
