"""Time the fused statistics kernel (`actdiag.hooks.fused`) on a GPU, against the read floor and the torch path.

    python bench/bench_fused.py --write BENCHMARKS.md            # on a GPU (bench/gpu_check.sh runs it)
    TRITON_INTERPRET=1 python bench/bench_fused.py --smoke --device cpu   # seconds; checks the script, no figures

Each case is one call of `fused_stats` on a list of tensors: single float32 and bfloat16 tensors from 4 Ki to 64 Mi
elements, and batches of many small tensors (a deep narrow model's activations). The time per call is wall time
over repeated calls between two `torch.cuda.synchronize()`, so it includes the host's launch cost, which is what
small tensors pay. Beside it: the bytes the kernel reads (two reads of every element, see the module docstring of
`actdiag.hooks.fused`) over that time, the floor (every element read once at the device's read bandwidth, measured
as in bench/bench_step.py) and the torch path (`stats.tensor_stats(x, path="device")` per tensor, exact, the
device path's code for a large tensor in its hook).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common  # noqa: I001 - puts the checkout on sys.path before actdiag is imported
import bench_step
import torch

from actdiag.hooks import fused
from actdiag.hooks.stats import tensor_stats


def cases(smoke: bool) -> list[tuple[str, list[tuple[int, torch.dtype]]]]:
    """(label, [(numel, dtype) of each tensor of the call])."""
    if smoke:
        return [("float32 x 1", [(3000, torch.float32)]), ("batch of 20", [(64, torch.float32)] * 20)]
    out = [(f"float32 x 1, 2**{e}", [(1 << e, torch.float32)]) for e in (12, 16, 20, 24, 26)]
    out.append(("bfloat16 x 1, 2**24", [(1 << 24, torch.bfloat16)]))
    out.append(("batch: 1204 x 2048 float32", [(2048, torch.float32)] * 1204))
    out.append(("batch: 474 mixed (64 .. 2**20) float32", [(64 << (k % 15), torch.float32) for k in range(474)]))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call(fn: Callable[[], Any], device: torch.device, budget_s: float) -> float:
    """Seconds per call of `fn` (wall time, the device synchronised before and after), after one warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    reps = max(1, min(1000, int(budget_s / once)))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the figures); cpu only to check the script (smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny cases, one call each")
    p.add_argument("--write", type=Path, default=None, help="replace the fused-kernel table in this Markdown file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_fused.py: no CUDA device (torch.cuda.is_available() is False)")
    if fused._triton() is None:
        raise SystemExit("bench_fused.py needs triton: pip install 'actdiag[gpu]'")
    budget = 0.0 if args.smoke else 0.3
    bandwidth = bench_step.read_bandwidth(args.smoke, device)
    header = ["case", "elements", "fused: us per call", "fused: GB/s read (2 reads)", "share of the read floor",
              "torch path: us", "torch / fused"]  # fmt: skip
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for label, spec in cases(args.smoke):
        xs = [torch.randn(n, generator=g, device=device).to(dtype) for n, dtype in spec]
        elems = sum(n for n, _ in spec)
        nbytes = sum(x.numel() * x.element_size() for x in xs)
        t_fused = per_call(lambda xs=xs: fused.fused_stats(xs), device, budget)
        t_torch = per_call(lambda xs=xs: [tensor_stats(x, path="device") for x in xs], device, budget)
        floor = nbytes / bandwidth
        rows.append([label, f"{elems:,}", f"{t_fused * 1e6:.1f}", f"{2 * nbytes / t_fused / 1e9:.1f}",
                     f"{floor / t_fused:.2f}", f"{t_torch * 1e6:.1f}", f"{t_torch / t_fused:.1f}x"])  # fmt: skip
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
        del xs
    lines = [f"Command: `{_common.command(__file__, argv)}`", ""]
    lines += _common.machine_lines()[1:4]
    lines.append(f"- read bandwidth (torch.sum): {bandwidth / 1e9:.1f} GB/s")
    lines += ["", *_common.markdown_table(header, rows)]
    return _common.publish(lines, args.write, "bench:gpu-fused")


if __name__ == "__main__":
    main()
