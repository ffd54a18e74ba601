"""What a recorded step costs Python's cyclic garbage collector, on the deep narrow model of bench_step.py.

    python bench/gc_step.py                           # every=1, 30 steps
    python bench/gc_step.py --every 50 --steps 2500   # the default interval
    python bench/gc_step.py --smoke                   # seconds; what tests/bench/test_bench_smoke.py runs

A process with torch imported holds a few hundred thousand tracked objects; a full (generation 2) collection walks
all of them, and runs whenever the objects promoted to the oldest generation exceed a quarter of the long-lived
ones. Two figures:

  survivors   the tracked objects one recorded step leaves alive (gc.collect(); gc.freeze(); one training step
              and monitor.step(); gc.collect(); len(gc.get_objects())), by type. The plain step's own are the new
              gradients (zero_grad sets them to None).
  GC ms       the time spent in collections (gc.callbacks) over --steps steps, per recorded step, by generation.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import _common  # noqa: I001 - puts the checkout on sys.path before actdiag is imported
import torch
import torch.nn.functional as F
from torch import nn

import actdiag


def measure(depth: int, width: int, batch: int, every: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, target = torch.randn(batch, width), torch.randn(batch, width)
    with actdiag.watch(model, every=every) as monitor:

        def step() -> None:
            opt.zero_grad()
            F.mse_loss(model(x), target).backward()
            opt.step()
            monitor.step()

        for _ in range(3 + (-3) % every):  # past the first steps, up to a recorded one
            step()
        gc.collect()
        gc.freeze()
        try:
            step()
            gc.collect()
            survivors = Counter(type(o).__name__ for o in gc.get_objects())
        finally:
            gc.unfreeze()
        spent: Counter[int] = Counter()
        runs: Counter[int] = Counter()
        started = [0.0]

        def timed(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                spent[info["generation"]] += time.perf_counter() - started[0]
                runs[info["generation"]] += 1

        gc.collect()
        recorded = monitor.recorded_steps
        gc.callbacks.append(timed)
        try:
            for _ in range(steps):
                step()
        finally:
            gc.callbacks.remove(timed)
        recorded = monitor.recorded_steps - recorded
    return {"survivors": survivors, "recorded": recorded, "spent": spent, "runs": runs}


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--steps", type=int, default=30, help="timed steps (after the survivors' step)")
    p.add_argument("--smoke", action="store_true", help="a tiny model and a few steps")
    args = p.parse_args(argv)
    depth, width, batch = (4, 16, 4) if args.smoke else (200, 64, 32)
    steps = min(args.steps, 2 * args.every + 2) if args.smoke else args.steps
    out = _common.with_threads(1, lambda: measure(depth, width, batch, args.every, steps))
    survivors, recorded, spent, runs = out["survivors"], out["recorded"], out["spent"], out["runs"]
    per = max(recorded, 1)
    lines = [
        f"deep narrow MLP {depth} x (Linear({width}) + ReLU), batch {batch}, one torch thread, every={args.every}",
        f"survivors of one recorded step: {sum(survivors.values())} "
        f"({', '.join(f'{name} {n}' for name, n in survivors.most_common(8))})",
        f"{steps} steps, {recorded} recorded: GC {sum(spent.values()) * 1e3 / per:.1f} ms per recorded step ("
        + ", ".join(f"gen {g}: {runs[g]} runs, {spent[g] * 1e3:.0f} ms" for g in sorted(runs))
        + ")",
    ]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
