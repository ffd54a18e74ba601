"""A deep tanh MLP initialised with weights drawn from N(0, 0.01^2): the classic way to make a network untrainable.

Each layer multiplies the spread of its input by about 0.01 * sqrt(fan_in) = 0.11 (fan_in 128), so after a few
layers the activations have collapsed toward zero and the gradients reaching the first layers are orders of
magnitude smaller than those at the top (Glorot & Bengio, 2010). actdiag names the layers and suggests Xavier
initialisation, which keeps the spread near 1.

    actdiag inspect examples/tanh_mlp.py
    actdiag inspect examples/tanh_mlp.py --html report.html --try-fixes
    python examples/tanh_mlp.py             # the same check from Python

Set ACTDIAG_EXAMPLE_SMALL=1 for a smaller network (the test suite does).
"""

from __future__ import annotations

import os

import torch
from torch import nn

SMALL = os.environ.get("ACTDIAG_EXAMPLE_SMALL") == "1"
WIDTH = 64 if SMALL else 128
DEPTH = 6 if SMALL else 8
BATCH = 32 if SMALL else 64
IN_FEATURES = 32 if SMALL else 64
CLASSES = 10


def build_model() -> nn.Module:
    layers: list[nn.Module] = []
    fan_in = IN_FEATURES
    for _ in range(DEPTH):
        linear = nn.Linear(fan_in, WIDTH)
        nn.init.normal_(linear.weight, mean=0.0, std=0.01)  # the bug: far too small for fan_in 128
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Tanh()]
        fan_in = WIDTH
    layers.append(nn.Linear(fan_in, CLASSES))
    return nn.Sequential(*layers)


def example_input() -> torch.Tensor:
    return torch.randn(BATCH, IN_FEATURES)


if __name__ == "__main__":
    import actdiag

    report = actdiag.inspect(build_model(), example_input())
    for finding in report.findings:
        print(f"{finding.severity:8} {finding.layer}: {finding.message}")
        for fix in finding.fixes:
            print(f"         fix ({fix.code}): {fix.text}")
    if not report.findings:
        print("no findings")
