"""The classic weight-initialisation experiment, diagnosed by actdiag.

A 6-layer MLP, 4096 units wide, on a batch of 16 Gaussian inputs, initialised several ways (the experiment of
Glorot & Bengio 2010, He et al. 2015 and the CS231n notes). For each setting it prints how the spread of the
activations evolves and what actdiag finds, with the first suggested fix; `--try-fixes` re-runs each broken setting
with that fix applied to a copy of the model and reports whether it cured it.

    python examples/weight_init.py                 # full size (4096 wide; about a minute on two cores)
    python examples/weight_init.py --small         # 128 wide, for the test suite (or ACTDIAG_SMALL=1)
    python examples/weight_init.py --try-fixes

At a smaller width the N(0, sigma^2) settings scale sigma by sqrt(4096 / width): what matters is the per-layer gain
sigma * sqrt(fan_in), and this keeps it equal to the full-size experiment's.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import actdiag
from actdiag.records import Report

FULL_WIDTH = 4096
SMALL_WIDTH = 128
BATCH = 16


@dataclass(frozen=True)
class Setting:
    name: str
    activation: type[nn.Module]
    depth: int
    init: Callable[[torch.Tensor, int], None]  # (weight, width) -> None, in place
    batchnorm: bool = False
    expect: tuple[str, ...] = ()  # the finding codes the experiment is known to produce
    expect_fix: str | None = None  # the fix that should come first


def _normal(std: float) -> Callable[[torch.Tensor, int], None]:
    def init(w: torch.Tensor, width: int) -> None:
        nn.init.normal_(w, 0.0, std * math.sqrt(FULL_WIDTH / width))

    return init


def _xavier(w: torch.Tensor, width: int) -> None:
    nn.init.xavier_normal_(w)


def _he(w: torch.Tensor, width: int) -> None:
    nn.init.kaiming_normal_(w, nonlinearity="relu")


SETTINGS = (
    Setting("tanh, N(0, 0.01^2)", nn.Tanh, 6, _normal(0.01), expect=("activation_collapse",), expect_fix="xavier_init"),
    Setting("tanh, N(0, 0.05^2)", nn.Tanh, 6, _normal(0.05), expect=("saturation",), expect_fix="xavier_init"),
    Setting("tanh, Xavier", nn.Tanh, 6, _xavier),
    Setting("ReLU, Xavier, 20 layers", nn.ReLU, 20, _xavier, expect=("activation_collapse",), expect_fix="he_init"),
    Setting("ReLU, He", nn.ReLU, 6, _he),
    Setting("sigmoid, N(0, 1)", nn.Sigmoid, 6, _normal(1.0), expect=("saturation",), expect_fix="xavier_init"),
    Setting("sigmoid, N(0, 1), BatchNorm", nn.Sigmoid, 6, _normal(1.0), batchnorm=True),
)


def build(setting: Setting, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(setting.depth):
        linear = nn.Linear(width, width)
        with torch.no_grad():
            setting.init(linear.weight, width)
            linear.bias.zero_()
        layers.append(linear)
        if setting.batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(setting.activation())
    return nn.Sequential(*layers)


def run(width: int = FULL_WIDTH, batch: int = BATCH, try_fixes: bool = False, seed: int = 0) -> list[Report]:
    """Inspect every setting; the reports, in the order of SETTINGS."""
    reports = []
    for setting in SETTINGS:
        torch.manual_seed(seed)
        model = build(setting, width)
        x = torch.randn(batch, width)
        reports.append(actdiag.inspect(model, x, try_fixes=try_fixes, seed=seed, name=setting.name))
    return reports


def describe(setting: Setting, report: Report) -> str:
    acts = [layer for layer in report.layers if layer.type == setting.activation.__name__]
    stds = " ".join(f"{layer.activation.std:.2g}" for layer in acts if layer.activation is not None)
    lines = [f"{setting.name}", f"  activation std by layer: {stds}"]
    if not report.findings:
        lines.append("  actdiag: nothing to report")
    for f in report.findings:
        lines.append(f"  actdiag: {f.severity} {f.code} at {f.layer}: {f.message}")
        if f.fixes:
            fix = f.fixes[0]
            verdict = {True: "verified", False: "did not help", None: "not tried"}[fix.verified]
            lines.append(f"    fix: {fix.code} ({verdict}): {fix.text}")
    expected = ", ".join(setting.expect) or "nothing"
    got = ", ".join(f.code for f in report.findings) or "nothing"
    lines.append(f"  expected: {expected}; found: {got}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help=f"{SMALL_WIDTH} units wide (also ACTDIAG_SMALL=1)")
    parser.add_argument("--width", type=int, default=None, help="layer width (default 4096, or 128 with --small)")
    parser.add_argument("--try-fixes", action="store_true", help="verify the suggested fixes on copies")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("ACTDIAG_SMALL", "") not in ("", "0")
    width = args.width or (SMALL_WIDTH if small else FULL_WIDTH)
    print(f"MLP {width} wide, batch {BATCH}\n")
    reports = run(width=width, try_fixes=args.try_fixes, seed=args.seed)
    for setting, report in zip(SETTINGS, reports):
        print(describe(setting, report))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
