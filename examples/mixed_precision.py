"""Mixed precision: float16's range problems, found from exponent histograms, and the fixes that remove them.

    python examples/mixed_precision.py                        # float16 autocast: fp16_overflow, fp16_underflow
    python examples/mixed_precision.py --loss-scaling         # + a GradScaler: the underflow finding goes away
    python examples/mixed_precision.py --dtype bfloat16       # bfloat16 autocast: no precision finding
    python examples/mixed_precision.py --scale 2e5            # past the edge: inf, then NaN everywhere (nonfinite)
    python examples/mixed_precision.py --plot docs/images/mixed_precision.png

The model has one layer (`wide`, an unnormalised projection) whose outputs reach ~2**15, within one doubling of
float16's largest value 65504; the LayerNorm after it divides by that large spread, so the gradients reaching `wide`
are ~2**-21, in float16's subnormal range (below 2**-14, where precision is lost, and near 2**-24, where values
flush to zero). Beside each linear histogram actdiag keeps a histogram of powers of two (exponents), counted in
float32 whatever the training dtype; the precision rules read them and report `fp16_overflow` / `fp16_underflow`
with the fixes (`bf16_autocast`, `loss_scaling`). bfloat16 keeps float32's exponent range, so nothing is reported
there; loss scaling multiplies the gradients back into float16's normal range.
`ACTDIAG_EXAMPLE_STEPS` overrides the default number of steps.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
from torch import nn

import actdiag
from actdiag.records import E_LOW, FP16_MAX, FP16_MIN_NORMAL_EXP, FP16_MIN_SUBNORMAL_EXP, ExponentHistogram

# Exponent e counts 2**(e-1) <= |x| < 2**e. Float16's largest value 65504 lies in bin 16, its normal range starts at
# 2**-14 and values below 2**-24 flush to zero.
NEAR_MAX_EXP = math.frexp(FP16_MAX)[1]  # bin 16: |x| >= 2**15, within one doubling of the maximum
SUBNORMAL_BELOW_EXP = FP16_MIN_NORMAL_EXP + 1  # |x| < 2**-14
UNDERFLOW_BELOW_EXP = FP16_MIN_SUBNORMAL_EXP + 1  # |x| < 2**-24


class Net(nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.embed = nn.Linear(32, 256)
        self.act = nn.GELU()
        self.wide = nn.Linear(256, 256)
        with torch.no_grad():
            self.wide.weight.mul_(scale)  # outputs up to ~2**15 at the default scale
        self.norm = nn.LayerNorm(256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.wide(self.act(self.embed(x)))))


def fraction_subnormal(h: ExponentHistogram | None) -> float:
    return h.fraction_below(SUBNORMAL_BELOW_EXP) if h is not None else math.nan


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
    lo, hi = -40, 24
    cols = slice(lo - E_LOW, hi - E_LOW + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.1), dpi=100, sharey=True, layout="constrained")
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
        ax.axvspan(lo - 0.5, UNDERFLOW_BELOW_EXP - 0.5, color="tab:blue", alpha=0.2, label="flushes to 0 in fp16")
        ax.axvspan(
            UNDERFLOW_BELOW_EXP - 0.5, SUBNORMAL_BELOW_EXP - 0.5, color="tab:blue", alpha=0.08, label="fp16 subnormal"
        )
        ax.axvspan(NEAR_MAX_EXP - 0.5, hi + 0.5, color="tab:red", alpha=0.12, label="within 2x of fp16 max, or past it")
        ax.set(title=f"{kind} magnitudes", xlabel="log2 |value|")
        ax.set_yticks(range(len(layers)), [f"{layer.label} ({layer.type})" for layer in layers])
    handles, names = axes[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.colorbar(im, ax=axes, label="fraction of values", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> actdiag.Monitor:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("ACTDIAG_EXAMPLE_STEPS", 20)))
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="autocast dtype")
    parser.add_argument("--loss-scaling", action="store_true", help="use a GradScaler (float16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=4e4, help="multiplier on wide.weight (1 = healthy)")
    parser.add_argument("--logdir", help="write TensorBoard event files here")
    parser.add_argument("--plot", help="save a PNG of the per-layer exponent histograms here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = Net(args.scale).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=args.loss_scaling)
    x = torch.randn(512, 32, device=device)
    y = torch.randint(0, 10, (512,), device=device)

    with actdiag.watch(model, every=args.every, logdir=args.logdir) as monitor:
        for step in range(args.steps):
            idx = torch.randint(0, len(x), (64,), device=device)
            with torch.autocast(device_type=device.type, dtype=dtype):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            scaler.scale(loss).backward()  # with loss scaling, every gradient is multiplied by the scale ...
            scaler.step(optimizer)  # ... and unscaled again before the update
            scaler.update()
            monitor.step()
            if step % max(args.steps // 4, 1) == 0:
                print(f"step {step:3d}  loss {loss.item():.3e}")

    scaling = f", loss scale {scaler.get_scale():g}" if args.loss_scaling else ""
    print(f"\n{args.dtype} autocast on {device.type}{scaling}; last recorded step (of {monitor.recorded_steps}):")
    header = ("layer", "dtype", "activations", "max |x|", "non-finite", "gradients", "<2^-14")
    print("{:<6} {:<9} {:<14} {:>9} {:>10}   {:<14} {:>7}".format(*header))
    for layer in monitor.report().layers:
        a, g = layer.activation, layer.gradient
        ae, ge = (a.exponents if a else None), (g.exponents if g else None)
        print(
            f"{layer.label:<6} {layer.dtype:<9} {exp_range(ae):<14} {a.abs_max if a else math.nan:9.3g} "
            f"{a.nonfinite_count if a else 0:>10}   {exp_range(ge):<14} {fraction_subnormal(ge):7.1%}"
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
