"""Time the statistics kernel (`actdiag.hooks.stats.tensor_stats`) on typical tensors, optionally against an older
revision of the same file.

    python bench/bench_kernel.py                       # this checkout: CPU fast path and masked (CUDA's) path,
                                                       # each exact and with exact=False
    python bench/bench_kernel.py --baseline 4d41497    # and the kernel as it was at that git revision

Each figure is the median of `--repeats` calls after two warm-up calls, in microseconds; the kernels are timed
alternately so drift hits both alike. `--threads 1` removes OpenMP from the picture (steadier on a busy machine).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import _common  # noqa: I001 - puts the checkout on sys.path before actdiag is imported
import count_ops
import torch

from actdiag.hooks import stats as current


def load_revision(rev: str) -> ModuleType:
    src = subprocess.run(
        ["git", "-C", str(_common.ROOT), "show", f"{rev}:actdiag/hooks/stats.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="actdiag-bench-kernel-")) / "stats_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("actdiag_stats_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def cases(smoke: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    s = 16 if smoke else 1

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        "activation 256x1024": randn(256 // s, 1024),
        "ReLU output 256x1024": torch.relu(randn(256 // s, 1024)),
        "weight 1024x1024": randn(1024 // s, 1024) * 0.03,
        "conv ReLU 32x64x16x16": torch.relu(randn(32 // s, 64, 16, 16)),
        "LayerNorm weight (ones) 1024": torch.ones(1024),
        "bias 1024": randn(1024),
    }


def time_alternating(fns: Sequence[Callable[[], Any]], repeats: int, cold: bool) -> list[float]:
    # --cold: before each call, write 32 MB with an ATen op on torch's threads, as a training step's kernels do
    # between two hooks: the caches are then cold and the OpenMP team has just run somewhere else.
    junk = torch.empty(8 * 1024 * 1024) if cold else None
    for f in fns:
        f()
        f()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            if junk is not None:
                junk.fill_(1.0)
            t0 = time.perf_counter()
            f()
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(s) * 1e6 for s in samples]


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=None, help="git revision whose stats.py to time beside this one")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--cold", action="store_true", help="evict the caches (an ATen op over 32 MB) before each call")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--write", type=Path, default=None, help="replace the kernel table in this Markdown file")
    args = p.parse_args(argv)
    return _common.with_threads(args.threads, lambda: run(args, argv))


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> list[str]:
    if args.smoke:
        args.repeats = 2
    base = load_revision(args.baseline) if args.baseline else None
    header = [
        "tensor", "fast path us", "fast, exact=False us", "masked path us", "masked, exact=False us",
        "ATen ops but views (GPU launches) fast / masked / masked exact=False",
    ]  # fmt: skip
    if base is not None:
        header += [f"{args.baseline} default us", "speed-up"]
    rows = []
    for name, x in cases(args.smoke).items():
        fns: list[Callable[[], Any]] = [
            lambda x=x: current.tensor_stats(x),
            lambda x=x: current.tensor_stats(x, exact=False),
            lambda x=x: current.tensor_stats(x, path="device"),
            lambda x=x: current.tensor_stats(x, path="device", exact=False),
        ]
        if base is not None:
            fns.append(lambda x=x: base.tensor_stats(x))
        t = time_alternating(fns, args.repeats, args.cold)
        ops = " / ".join(str(count_ops.counted(fns[i])[0]) for i in (0, 2, 3))
        row = [name, *(f"{v:.0f}" for v in t[:4]), ops]
        if base is not None:
            row += [f"{t[4]:.0f}", f"{t[4] / t[0]:.1f}x"]
        rows.append(row)
    lines = [f"Command: `{_common.command(__file__, argv)}`"]
    lines += ["", f"torch threads: {torch.get_num_threads()}; caches {'cold' if args.cold else 'warm'}", ""]
    lines += _common.markdown_table(header, rows)
    return _common.publish(lines, args.write, "bench:kernel")


if __name__ == "__main__":
    main()
