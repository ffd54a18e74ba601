"""Count the ATen ops that actdiag adds to a recorded training step on the device path (CUDA's code, run on the CPU
with `path="device"`). On a GPU every op that is not a view is a kernel launch, and each costs the host several
microseconds whatever the tensor's size: for a model with hundreds of measured tensors the launches, not the
arithmetic, can set what a recorded step costs. This is the one GPU figure that needs no GPU.

    python bench/count_ops.py                      # mlp, cnn and GPT-2 small's layout
    python bench/count_ops.py --models gpt --write BENCHMARKS.md
    python bench/count_ops.py --smoke              # seconds; what tests/bench/test_bench_smoke.py runs

Op counts do not depend on batch or sequence sizes, so the GPT row uses GPT-2 small's layout (12 layers, d=768,
12 heads, vocab 50257, untied head) at batch 1 and 128 tokens. Views (reshape, select, slice, detach) are ATen ops
too but launch nothing; the table counts them apart.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common  # noqa: I001 - puts the checkout on sys.path before actdiag is imported
import bench_step
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import actdiag
from actdiag.monitor import DEFAULT_EVERY
from actdiag.records import measured_stats

# Ops that return a view of their input (no kernel, no allocation).
_VIEWS = {"detach", "view", "_unsafe_view", "reshape", "select", "slice", "alias", "as_strided", "expand", "t",
          "unsqueeze", "squeeze", "permute", "transpose", "unbind", "split", "lift_fresh"}  # fmt: skip


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.views = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in _VIEWS:
            self.views += 1
        else:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def _gpt2_layout(smoke: bool) -> bench_step.Workload:
    vocab, ctx, d, layers, heads = (64, 8, 16, 1, 2) if smoke else (50257, 128, 768, 12, 12)
    idx = torch.randint(0, vocab, (1, ctx + 1), generator=torch.Generator().manual_seed(1))
    inp, tgt = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    return bench_step.Workload(
        "gpt",
        f"GPT-2 small's layout ({layers} layers, d={d}, {heads} heads, vocab {vocab}) at batch 1 x {ctx} tokens",
        lambda: bench_step.GPT(vocab, ctx, d, layers, heads),
        inp,
        lambda out: F.cross_entropy(out.reshape(-1, vocab), tgt.reshape(-1)),
    )


def counted(fn: Callable[[], Any]) -> tuple[int, int]:
    """(ATen ops that are not views, views) that one call of `fn` dispatches: on a GPU the first are (at least) one
    kernel launch each."""
    with _Counter() as c:
        fn()
    return c.ops, c.views


def count(load: bench_step.Workload, every: int) -> dict[str, Any]:
    """Ops of one plain step, and of one recorded step at `every` minus the plain one, on the device path."""
    torch.manual_seed(0)
    model = load.build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bench_step.train_step(model, opt, load)  # first-call work (optimizer state) out of the count
    plain = counted(lambda: bench_step.train_step(model, opt, load))
    with actdiag.watch(model, every=every) as monitor:
        monitor.recorder.path = "device"  # the device path's code, on the CPU
        for _ in range(2):  # the sample indices drawn, the buffers grown
            bench_step.train_step(model, opt, load)
            monitor.step()
        while not monitor.recorder.recording:
            bench_step.train_step(model, opt, load)
            monitor.step()

        def recorded() -> None:
            bench_step.train_step(model, opt, load)
            monitor.step()

        watched = counted(recorded)
        rec = monitor.latest
        assert rec is not None
        tensors = len({id(s) for s in measured_stats(rec.layers, rec.params)})
    return {"plain": plain, "extra": (watched[0] - plain[0], watched[1] - plain[1]), "tensors": tensors}


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,cnn,gpt", help="comma-separated: mlp, cnn, gpt (GPT-2 small's layout)")
    p.add_argument("--smoke", action="store_true", help="tiny models")
    p.add_argument("--write", type=Path, default=None, help="replace the op-count table in this Markdown file")
    args = p.parse_args(argv)
    header = ["model", "plain step: ops (+ views)", "tensors measured", "interval", "actdiag's ops (+ views)",
              "ops per tensor", "ops vs the plain step"]  # fmt: skip
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        if name not in ("mlp", "cnn", "gpt"):
            raise ValueError(f"unknown model {name!r}; choose from mlp, cnn, gpt")
        load = _gpt2_layout(args.smoke) if name == "gpt" else bench_step.workload(name, args.smoke)
        for every in (1, DEFAULT_EVERY):
            got = count(load, every)
            (p_ops, p_views), (ops, views), n = got["plain"], got["extra"], got["tensors"]
            rows.append([f"{name}: {load.description}", f"{p_ops} (+{p_views})", str(n), f"every={every}",
                         f"{ops} (+{views})", f"{ops / n:.1f}", f"{ops / p_ops:.1f}x"])  # fmt: skip
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    lines = [f"Command: `{_common.command(__file__, argv)}`", ""]
    lines += _common.machine_lines()[3:4]  # the versions and the git revision
    lines += ["", *_common.markdown_table(header, rows)]
    return _common.publish(lines, args.write, "bench:ops")


if __name__ == "__main__":
    main()
