"""A plain PyTorch training loop wrapped with `actdiag.watch`.

    python examples/plain_loop.py                      # 60 steps, a few seconds on a laptop CPU
    python examples/plain_loop.py --init small         # N(0, 0.01^2) weights: the signal dies layer after layer
    python examples/plain_loop.py --steps 20 --plot docs/images/plain_loop.png --logdir runs/plain --json out.json

A 6-layer tanh MLP learns a synthetic 4-class problem. Every `--every` steps actdiag records each layer's activation
and gradient statistics; at the end the script prints the per-layer table of the last recorded step and the findings.
`ACTDIAG_EXAMPLE_STEPS` overrides the default number of steps (the test suite uses it to keep runs short).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import actdiag


def build_model(init: str, width: int = 128, depth: int = 6) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan_in = 16
    for _ in range(depth):
        linear = nn.Linear(fan_in, width)
        if init == "small":
            nn.init.normal_(linear.weight, std=0.01)  # too small for tanh: each layer shrinks the signal ~10x
        else:
            nn.init.xavier_uniform_(linear.weight, gain=nn.init.calculate_gain("tanh"))
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Tanh()]
        fan_in = width
    layers.append(nn.Linear(fan_in, 4))
    return nn.Sequential(*layers)


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, 0] > 0).long() * 2 + (x[:, 1] * x[:, 2] > 0).long()  # 4 classes, not linearly separable
    return x, y


def plot(monitor: actdiag.Monitor, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = monitor.history
    labels = [lb for lb in hist.layers if isinstance(dict(monitor.model.named_modules())[lb], nn.Tanh)]
    fig, (ax_a, ax_g) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    cmap = plt.get_cmap("viridis")
    n = len(hist.steps)
    for i in range(n):
        colour = cmap(i / max(n - 1, 1))
        ax_a.plot(range(1, len(labels) + 1), [hist.layers[lb]["act_std"][i] for lb in labels], color=colour)
        ax_g.plot(range(1, len(labels) + 1), [hist.layers[lb]["grad_norm"][i] for lb in labels], color=colour)
    ax_a.set(title="activation std per tanh layer", xlabel="layer (depth)", ylabel="std", yscale="log")
    ax_g.set(title="gradient norm at each tanh output", xlabel="layer (depth)", ylabel="norm", yscale="log")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(hist.steps[0], hist.steps[-1]))
    fig.colorbar(sm, ax=ax_g, label="training step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> actdiag.Monitor:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("ACTDIAG_EXAMPLE_STEPS", 60)))
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--init", choices=["xavier", "small"], default="xavier")
    parser.add_argument("--logdir", help="write TensorBoard event files here")
    parser.add_argument("--json", help="write the JSON report here")
    parser.add_argument("--plot", help="save a PNG of per-layer activation std and gradient norm here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = build_model(args.init)
    x, y = make_data(2048, args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    with actdiag.watch(model, every=args.every, logdir=args.logdir) as monitor:
        for step in range(args.steps):
            idx = torch.randint(0, len(x), (64,))
            loss = criterion(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step()
            if step % max(args.steps // 5, 1) == 0:
                print(f"step {step:4d}  loss {loss.item():.3f}")

    print(f"\nrecorded {monitor.recorded_steps} of {monitor.steps} steps; last recorded step, per layer:")
    print(f"{'layer':<6} {'type':<8} {'act std':>9} {'grad norm':>10}")
    for layer in monitor.report().layers:
        std = layer.activation.std if layer.activation else float("nan")
        norm = layer.gradient.norm if layer.gradient else float("nan")
        print(f"{layer.label:<6} {layer.type:<8} {std:9.3g} {norm:10.3g}")
    print(f"\nfindings: {len(monitor.findings)}")
    for f in monitor.findings:
        print(f"  {f.severity:<7} {f.layer}: {f.code}: {f.message}")
    if args.json:
        print(f"JSON report: {monitor.save_json(args.json)}")
    if args.plot:
        plot(monitor, args.plot)
        print(f"plot: {args.plot}")
    return monitor


if __name__ == "__main__":
    main()
