"""Lightning: add `ActdiagCallback` to the Trainer's callbacks.

    python examples/lightning_example.py                           # 2 epochs of a small CNN, a few seconds
    python examples/lightning_example.py --out runs/lightning --plot docs/images/lightning.png
    tensorboard --logdir runs/lightning                            # actdiag's histograms beside Lightning's scalars

A small CNN with BatchNorm classifies synthetic 16x16 images (a bright quadrant decides the class). The callback
records every `--every` optimizer steps, writes into the TensorBoardLogger's run directory and prints the findings
when training ends; they stay on `callback.findings`. `ACTDIAG_EXAMPLE_STEPS` overrides the number of steps.
Needs `pip install "actdiag[lightning]"`.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from actdiag.integrations.lightning import ActdiagCallback

try:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
except ImportError:
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.loggers import TensorBoardLogger  # type: ignore[assignment]


class SmallCNN(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.5
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 1.0
    return TensorDataset(x, y)


def plot(callback: ActdiagCallback, path: str) -> None:
    """The classic figure: one activation histogram per layer, in forward order, at the last recorded step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert callback.monitor is not None
    layers = [layer for layer in callback.monitor.report().layers if layer.activation is not None]
    cols = 5
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 1.7 * rows), dpi=90, squeeze=False, layout="constrained")
    for ax, layer in zip(axes.flat, layers):
        assert layer.activation is not None
        h = layer.activation.histogram
        widths = [b - a for a, b in zip(h.edges[:-1], h.edges[1:])]
        ax.bar(h.edges[:-1], h.counts, width=widths, align="edge", color="tab:blue")
        ax.set_title(f"{layer.label} ({layer.type})", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.suptitle(f"activation histograms at step {layers[0].step} (Lightning, ActdiagCallback)", fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> ActdiagCallback:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("ACTDIAG_EXAMPLE_STEPS", 32)))
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--out", default="runs/lightning", help="TensorBoardLogger root directory")
    parser.add_argument("--plot", help="save a PNG of the per-layer activation histograms here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(args.seed, verbose=False)
    train = DataLoader(make_data(512, args.seed), batch_size=32, shuffle=True)
    val = DataLoader(make_data(128, args.seed + 1), batch_size=64)
    callback = ActdiagCallback(every=args.every)
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[callback],
        logger=TensorBoardLogger(args.out, name="small_cnn"),
        accelerator="cpu",
        log_every_n_steps=4,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(SmallCNN(), train, val)
    print(f"callback.findings: {callback.findings}")
    if args.plot:
        plot(callback, args.plot)
        print(f"plot: {args.plot}")
    return callback


if __name__ == "__main__":
    main()
