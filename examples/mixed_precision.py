"""Mixed precision: what float16 would do to a model's activations and gradients, read from exponent histograms.

    python examples/mixed_precision.py                        # bfloat16 autocast: trains fine
    python examples/mixed_precision.py --dtype float16        # float16 autocast: the same model overflows to inf
    python examples/mixed_precision.py --plot docs/images/mixed_precision.png

The model has one layer (`wide`, an unnormalised projection) whose outputs reach ~2**18, past float16's largest
value 65504; the LayerNorm after it divides by that huge spread, so the gradients reaching `wide` are ~2**-30, below
float16's smallest subnormal 2**-24. Under bfloat16, which keeps float32's exponent range, both are representable
and the model trains; under float16 the first step overflows to inf, the optimizer writes NaN into the weights and
every later step is non-finite. actdiag records, beside each linear histogram, a histogram of powers of two
(exponents) computed in float32, so these ranges are visible whatever the training dtype, and the precision rules
report them as `fp16_overflow` / `fp16_underflow` before anyone switches to float16.
`ACTDIAG_EXAMPLE_STEPS` overrides the default number of steps.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from torch import nn

import actdiag
from actdiag.records import E_LOW, FP16_MAX, FP16_MIN_SUBNORMAL_EXP, ExponentHistogram

# Exponent e counts 2**(e-1) <= |x| < 2**e. Float16 overflows from 65504 (just under 2**16), so bins e >= 17 overflow
# and part of bin 16; values below 2**-24 (bins e <= -24) flush to zero.
OVERFLOW_FROM_EXP = math.frexp(FP16_MAX)[1] + 1
UNDERFLOW_BELOW_EXP = FP16_MIN_SUBNORMAL_EXP + 1


class Net(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.embed = nn.Linear(32, 256)
        self.act = nn.GELU()
        self.wide = nn.Linear(256, 256)
        with torch.no_grad():
            self.wide.weight.mul_(scale)  # outputs of order 2**18 at the default scale
        self.norm = nn.LayerNorm(256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.wide(self.act(self.embed(x)))))


def overflow_fraction(h: ExponentHistogram | None) -> float:
    return h.fraction_at_least(OVERFLOW_FROM_EXP) if h is not None else math.nan


def underflow_fraction(h: ExponentHistogram | None) -> float:
    return h.fraction_below(UNDERFLOW_BELOW_EXP) if h is not None else math.nan


def exp_range(h: ExponentHistogram | None) -> str:
    r = h.nonzero_range() if h is not None else None
    return "-" if r is None else f"2^{r[0] - 1}..2^{r[1]}"


def plot(monitor: actdiag.Monitor, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    layers = [layer for layer in monitor.report().layers if layer.activation is not None]
    lo, hi = -48, 24
    cols = slice(lo - E_LOW, hi - E_LOW + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100, sharey=True, layout="constrained")
    for ax, kind in zip(axes, ("activation", "gradient")):
        grid = np.full((len(layers), hi - lo + 1), np.nan)
        for i, layer in enumerate(layers):
            stats = getattr(layer, kind)
            if stats is not None and stats.exponents.total:
                row = np.asarray(stats.exponents.counts[cols]) / stats.exponents.total
                grid[i] = np.where(row > 0, row, np.nan)
        im = ax.imshow(
            grid,
            aspect="auto",
            cmap="magma_r",
            norm=LogNorm(1e-4, 1),
            extent=(lo - 0.5, hi + 0.5, len(layers) - 0.5, -0.5),
        )
        ax.axvspan(lo - 0.5, UNDERFLOW_BELOW_EXP - 0.5, color="tab:blue", alpha=0.12, label="flushes to 0 in fp16")
        ax.axvspan(OVERFLOW_FROM_EXP - 0.5, hi + 0.5, color="tab:red", alpha=0.12, label="overflows fp16")
        ax.set(title=f"{kind} magnitudes", xlabel="log2 |value|")
        ax.set_yticks(range(len(layers)), [f"{layer.label} ({layer.type})" for layer in layers])
    axes[1].legend(loc="upper right", fontsize=8, framealpha=0.9)
    fig.colorbar(im, ax=axes, label="fraction of values", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> actdiag.Monitor:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("ACTDIAG_EXAMPLE_STEPS", 20)))
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="autocast dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=2e5, help="multiplier on wide.weight (1 = healthy)")
    parser.add_argument("--loss-weight", type=float, default=1.0, help="multiplier on the loss (1 = healthy)")
    parser.add_argument("--logdir", help="write TensorBoard event files here")
    parser.add_argument("--plot", help="save a PNG of the per-layer exponent histograms here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = Net(args.scale).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(512, 32, device=device)
    y = torch.randint(0, 10, (512,), device=device)

    with actdiag.watch(model, every=args.every, logdir=args.logdir) as monitor:
        for step in range(args.steps):
            idx = torch.randint(0, len(x), (64,), device=device)
            with torch.autocast(device_type=device.type, dtype=dtype):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) * args.loss_weight
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step()
            if step % max(args.steps // 4, 1) == 0:
                print(f"step {step:3d}  loss {loss.item():.3e}")

    print(f"\n{args.dtype} autocast on {device.type}; last recorded step (of {monitor.recorded_steps}):")
    print(
        f"{'layer':<6} {'dtype':<9} {'activation range':<16} {'>fp16 max':>9} {'non-finite':>10}   "
        f"{'gradient range':<16} {'<fp16 min':>9}"
    )
    for layer in monitor.report().layers:
        a, g = layer.activation, layer.gradient
        print(
            f"{layer.label:<6} {layer.dtype:<9} {exp_range(a.exponents if a else None):<16} "
            f"{overflow_fraction(a.exponents if a else None):9.1%} {a.nonfinite_count if a else 0:>10}   "
            f"{exp_range(g.exponents if g else None):<16} {underflow_fraction(g.exponents if g else None):9.1%}"
        )
    print(f"\nfindings: {len(monitor.findings)}")
    for f in monitor.findings:
        fixes = ", ".join(fix.code for fix in f.fixes)
        print(f"  {f.severity:<7} {f.layer}: {f.code}: {f.message}" + (f" [fix: {fixes}]" if fixes else ""))
    if args.plot:
        plot(
            monitor,
            args.plot,
            f"exponent histograms under {args.dtype} autocast, step {monitor.report().layers[0].step}",
        )
        print(f"plot: {args.plot}")
    return monitor


if __name__ == "__main__":
    main()
