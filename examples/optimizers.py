"""One model, seven optimizers: how big their steps are relative to the weights, watched by actdiag.

The same small MLP (same initial weights) is trained on the same regression task with SGD, Momentum, Nesterov,
AdaGrad, RMSProp, Adam and Adadelta, under `actdiag.watch`. For each optimizer it prints the update-to-weight
ratio ||dW|| / ||W|| of the first layer at the start, the middle and the end of training (CS231n's rule of thumb puts
a healthy ratio near 1e-3), the final loss, and what actdiag finds. AdaGrad divides its step by the root of the sum
of all squared gradients so far, so its effective learning rate decays towards zero: that is where
`stalled_updates` appears.

    python examples/optimizers.py            # 3000 steps
    python examples/optimizers.py --small    # 600 steps, for the test suite (or ACTDIAG_SMALL=1)
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import actdiag
from actdiag.records import Finding

OPTIMIZERS: dict[str, Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05),
    "Momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "Nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "AdaGrad": lambda p: torch.optim.Adagrad(p, lr=0.01),
    "RMSProp": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
}


@dataclass(frozen=True)
class Result:
    name: str
    ratios: tuple[float, ...]  # first layer's update ratio at each recorded step
    loss: float
    findings: tuple[Finding, ...]


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def make_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x[:, :1] * 2) + 0.5 * x[:, 1:2] * x[:, 2:3]
    return x, y


def train(name: str, steps: int, every: int, seed: int = 0) -> Result:
    model = make_model(seed)
    opt = OPTIMIZERS[name](model.parameters())
    x, y = make_data(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    loss = torch.tensor(math.nan)
    with actdiag.watch(model, every=every, name=name) as monitor:
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (64,), generator=g)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    history = monitor.history
    ratios = tuple(v for v in history.layers.get("0", {}).get("update_ratio", ()) if math.isfinite(v))
    return Result(name, ratios, float(loss.detach()), monitor.findings)


def run(steps: int, every: int, seed: int = 0) -> list[Result]:
    return [train(name, steps, every, seed) for name in OPTIMIZERS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="600 steps (also ACTDIAG_SMALL=1)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("ACTDIAG_SMALL", "") not in ("", "0")
    steps = args.steps or (600 if small else 3000)
    every = max(1, steps // 60)
    print(f"{steps} steps, recording every {every}\n")
    print(f"{'optimizer':10s} {'ratio@start':>12s} {'ratio@mid':>10s} {'ratio@end':>10s} {'loss':>8s}  findings")
    for r in run(steps, every, args.seed):
        start, mid, end = (r.ratios[0], r.ratios[len(r.ratios) // 2], r.ratios[-1]) if r.ratios else (math.nan,) * 3
        codes = ", ".join(f"{f.code} ({f.layer})" for f in r.findings) or "-"
        print(f"{r.name:10s} {start:12.2e} {mid:10.2e} {end:10.2e} {r.loss:8.4f}  {codes}")
        for f in r.findings:
            print(f"{'':10s} {f.severity}: {f.message}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
