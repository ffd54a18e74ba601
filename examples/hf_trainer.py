"""Hugging Face Trainer: add `ActdiagCallback` to the Trainer's callbacks.

    python examples/hf_trainer.py                                  # a 2-layer GPT-2, 24 steps, a few seconds
    python examples/hf_trainer.py --out runs/hf --plot docs/images/hf_trainer.png
    tensorboard --logdir runs/hf/runs                              # actdiag's histograms beside the Trainer's logs

The model is a tiny GPT-2 built from a config with random weights and the data are synthetic token sequences (each
sequence repeats a random 8-token motif, so there is something to learn): nothing is downloaded. The callback
records every `--every` optimizer steps, writes into the Trainer's TensorBoard run directory (`report_to`
includes "tensorboard") and prints the findings when training ends; they stay on `callback.findings`.
`ACTDIAG_EXAMPLE_STEPS` overrides the number of steps. Needs `pip install "actdiag[transformers]"`.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub; never try to reach it

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from actdiag.integrations.transformers import ActdiagCallback


class MotifTokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Sequences that repeat a random motif: the second half is predictable from the first."""

    def __init__(self, n: int, length: int, vocab: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        motifs = torch.randint(0, vocab, (n, 8), generator=g)
        self.ids = motifs.repeat(1, length // 8)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def plot(callback: ActdiagCallback, path: str) -> None:
    """Gradient norm and activation std of every recorded layer, in forward order, at the last recorded step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert callback.monitor is not None
    layers = [
        layer
        for layer in callback.monitor.report().layers
        if layer.gradient is not None and layer.activation is not None and "dropout" not in layer.type.lower()
    ]
    names = [layer.label.replace("transformer.", "") for layer in layers]
    fig, (ax_g, ax_a) = plt.subplots(
        1, 2, figsize=(10, 0.22 * len(layers) + 1.2), dpi=90, sharey=True, layout="constrained"
    )
    ax_g.barh(names, [layer.gradient.norm for layer in layers if layer.gradient], color="tab:orange")
    ax_g.set(xscale="log", title="gradient norm at the layer's output", xlabel="norm")
    ax_a.barh(names, [layer.activation.std for layer in layers if layer.activation], color="tab:blue")
    ax_a.set(xscale="log", title="activation std", xlabel="std")
    ax_g.invert_yaxis()
    ax_g.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"tiny GPT-2 under the HF Trainer, step {layers[0].step}", fontsize=9)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> ActdiagCallback:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("ACTDIAG_EXAMPLE_STEPS", 24)))
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--out", default="runs/hf", help="the Trainer's output_dir")
    parser.add_argument("--plot", help="save a PNG of per-layer gradient norm and activation std here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)  # random init from the config: no download
    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=max(args.steps // 2, 1),
        logging_steps=max(args.steps // 4, 1),
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=args.seed,
    )
    callback = ActdiagCallback(every=args.every)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=MotifTokens(256, 32, config.vocab_size, args.seed),
        eval_dataset=MotifTokens(32, 32, config.vocab_size, args.seed + 1),
        callbacks=[callback],
    )
    trainer.train()
    print(f"callback.findings: {callback.findings}")
    if args.plot:
        plot(callback, args.plot)
        print(f"plot: {args.plot}")
    return callback


if __name__ == "__main__":
    main()
