"""Where the time of a recorded step goes: timers around actdiag's own functions inside `watch(every=1)`.

    python bench/profile_step.py --model cnn --malloc-fixed   # one of bench_step's models, 20 recorded steps
    python bench/profile_step.py --model gpt --steps 40 --exact
    python bench/profile_step.py --smoke                # seconds; what tests/bench/test_bench_smoke.py runs

bench_step.py says how much a recorded step costs; this says where, so that work on the overhead starts from
figures. Each part is timed by wrapping the function that does it (nested parts are also inside their callers:
"statistics" is inside the hooks, "decode" inside "end of step"). What no timer sees (torch calling the hooks,
caches the statistics evicted, allocator effects) is the difference between the step's extra time in bench_step.py
and the sum of the top-level parts here.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import _common  # also puts the checkout on sys.path
import bench_step
import torch

import actdiag
from actdiag.hooks import recorder, stats

# (label, owner, attribute, top level): the top-level parts do not nest in one another.
PARTS: tuple[tuple[str, Any, str, bool], ...] = (
    ("forward hooks (activations)", recorder.Recorder, "_record_output", True),
    ("activation-gradient hooks", recorder.Recorder, "_grad_hook", True),
    ("parameter hooks (weights, weight gradients)", recorder.Recorder, "_param_grad_hook", True),
    ("end of step (batch, update ratios, read-back, decode)", recorder.Recorder, "end", True),
    ("begin of step (hooks registered)", recorder.Recorder, "begin", True),
    ("  statistics of a large tensor (tensor_stats)", recorder, "tensor_stats", False),
    ("    of which estimated from the sample", stats, "_stats_estimated", False),
    ("      of which the sample's two histograms", stats, "_histograms_into", False),
    ("  dead/rare ReLU units (unit_activity)", recorder, "unit_activity", False),
    ("  small tensors measured together (SmallBatch.finish)", stats.SmallBatch, "finish", False),
    ("  decode into records", recorder.Recorder, "_decode", False),
)


@contextmanager
def timed(totals: dict[str, float], calls: dict[str, int]) -> Iterator[None]:
    """Wrap every part's function with a timer for the duration of the block."""
    saved = []
    for label, owner, attr, _ in PARTS:
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        def wrapper(*args: Any, _fn: Callable[..., Any] = fn, _label: str = label, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_label] += time.perf_counter() - t0
                calls[_label] += 1

        setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


def profile(model_name: str, steps: int, exact: bool | None, smoke: bool) -> list[str]:
    load = bench_step.workload(model_name, smoke)
    torch.manual_seed(0)
    model = load.build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(monitor: Any = None) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        load.loss(model(load.inputs)).backward()
        opt.step()
        if monitor is not None:
            monitor.step()
        return time.perf_counter() - t0

    warm = 1 if smoke else 3
    plain = [step() for _ in range(warm + steps)][warm:]
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    # The timers go on before the warm-up: hooks are registered one step ahead (in the previous monitor.step()),
    # and a hook registered before its function was wrapped would escape the timer.
    with actdiag.watch(model, every=1, exact=exact) as monitor, timed(totals, calls):
        for _ in range(warm):
            step(monitor)
        totals.clear()
        calls.clear()
        watched = [step(monitor) for _ in range(steps)]
    plain_ms, watched_ms = _common.median(plain) * 1e3, _common.median(watched) * 1e3
    top = sum(totals[label] for label, _, _, is_top in PARTS if is_top) / steps * 1e3
    lines = [
        f"**{model_name}**: {load.description}; watch(every=1, exact={exact}), {steps} recorded steps",
        "",
        f"- unmonitored step (the same model, just before): {plain_ms:.1f} ms; recorded step (timers on): "
        f"{watched_ms:.1f} ms; extra {watched_ms - plain_ms:.1f} ms",
        f"- inside actdiag's functions: {top:.1f} ms per recorded step; the rest of the extra is what no timer sees",
        "",
    ]
    body = []
    for label, _, _, _ in PARTS:
        n = calls[label] / steps
        ms = totals[label] / steps * 1e3
        body.append([label, f"{ms:.2f}", f"{n:.0f}", f"{ms * 1e3 / n:.0f}" if n else ""])
    lines += _common.markdown_table(["part", "ms / recorded step", "calls / step", "us / call"], body)
    return lines


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn", choices=bench_step.ALL_MODELS)
    p.add_argument("--steps", type=int, default=20, help="recorded steps timed (default 20)")
    p.add_argument("--exact", action="store_true", help="exact=True instead of the every=1 default (estimated)")
    p.add_argument("--malloc-fixed", action="store_true", help="fix glibc's mmap/trim thresholds, as bench_step.py")
    p.add_argument("--smoke", action="store_true", help="a tiny model and 2 steps: checks the script, times nothing")
    args = p.parse_args(argv)
    steps = 2 if args.smoke else args.steps
    if steps < 1:
        p.error("--steps must be at least 1")
    if args.malloc_fixed and not _common.fix_malloc():
        print("[profile] --malloc-fixed: no mallopt here; the allocator keeps its defaults", file=sys.stderr)
    lines = profile(args.model, steps, True if args.exact else None, args.smoke)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
