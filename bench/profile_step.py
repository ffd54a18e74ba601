"""Where the time of a recorded step goes: timers around actdiag's own functions inside `watch(every=1)`.

    python bench/profile_step.py --model cnn --malloc-fixed   # one of bench_step's models, 20 recorded steps
    python bench/profile_step.py --model gpt --steps 40 --exact
    python bench/profile_step.py --smoke                # seconds; what tests/bench/test_bench_smoke.py runs
    python bench/profile_step.py --model cnn --ablate --malloc-fixed   # what if a part cost nothing?

bench_step.py says how much a recorded step costs; this says where, so that work on the overhead starts from
figures. Each part is timed by wrapping the function that does it (nested parts are also inside their callers:
"statistics" is inside the hooks, "decode" inside "end of step"). What no timer sees (torch calling the hooks,
caches the statistics evicted, allocator effects) is the difference between the step's extra time in bench_step.py
and the sum of the top-level parts here.

`--ablate` answers the other question, what a recorded step would cost if a part were free: copies of the model
train side by side, interleaved as in bench_step.py, one unmonitored, one watched, and watched copies with parts
replaced by stand-ins that do (almost) nothing (`ABLATIONS`). The results are not valid statistics; only the time
means something. This bounds what any faster implementation of a part (a compiled kernel, say) could buy.
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
import numpy as np
import torch

import actdiag
from actdiag import history
from actdiag.hooks import host, layout, recorder
from actdiag.records import StepRecord

# (label, owner, attribute, top level): the top-level parts do not nest in one another.
PARTS: tuple[tuple[str, Any, str, bool], ...] = (
    ("forward hooks (activations)", recorder.Recorder, "_record_output", True),
    ("activation-gradient hooks", recorder.Recorder, "_grad_hook", True),
    ("parameter hooks (weights, weight gradients)", recorder.Recorder, "_param_grad_hook", True),
    ("end of step (batch, update ratios, read-back, decode)", recorder.Recorder, "end", True),
    ("begin of step (hooks registered)", recorder.Recorder, "begin", True),
    ("  a large tensor measured alone (tensor_stats)", recorder, "tensor_stats", False),
    ("  a large tensor's one pass and sample copy (HostBatch._take_large)", host.HostBatch, "_take_large", False),
    ("  dead/rare ReLU units (unit_activity)", recorder, "unit_activity", False),
    ("  tensors measured together (HostBatch.finish)", host.HostBatch, "finish", False),
    ("    of which the large tensors' samples (_estimate_rows)", host, "_estimate_rows", False),
    ("  decode into records", recorder, "decode_step", False),
)


@contextmanager
def _patched(patches: Sequence[tuple[Any, str, Any]]) -> Iterator[None]:
    """Set each (owner, attribute) to its replacement for the duration of the block, then put the originals back."""
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    for owner, attr, fn in patches:
        setattr(owner, attr, fn)
    try:
        yield
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


@contextmanager
def timed(totals: dict[str, float], calls: dict[str, int]) -> Iterator[None]:
    """Wrap every part's function with a timer for the duration of the block."""

    def timer(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - t0
                calls[label] += 1

        return wrapper

    with _patched([(owner, attr, timer(label, getattr(owner, attr))) for label, owner, attr, _ in PARTS]):
        yield


def profile(model_name: str, steps: int, exact: bool | None, smoke: bool) -> list[str]:
    load = bench_step.workload(model_name, smoke)
    torch.manual_seed(0)
    model = load.build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(monitor: Any = None) -> float:
        t0 = time.perf_counter()
        bench_step.train_step(model, opt, load)
        if monitor is not None:
            monitor.step()
        return time.perf_counter() - t0

    warm = 1 if smoke else 3
    plain = [step() for _ in range(warm + steps)][warm:]
    totals: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    # The timers go on before the warm-up: hooks are registered one step ahead (in the previous monitor.step()),
    # and a hook registered before its function was wrapped would escape the timer.
    accuracy = "exact" if exact else "auto"
    with actdiag.watch(model, every=1, accuracy=accuracy) as monitor, timed(totals, calls):
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


# ============================================================================================== ablation
def _head_only(samples: Any, n: Any, mean: Any, mn: Any, mx: Any, bins: int, scratch: Any = None) -> np.ndarray:
    """Stand-in for host._estimate_rows: each row's exact parts (from every element), no sample statistics."""
    out = np.zeros((samples.shape[0], layout.STATS.length(bins)))
    layout.STATS.put(out, count=n, mean=mean, min=mn, max=mx)
    return out


def _no_pass(self: Any, key: Any, x: torch.Tensor, n: int) -> Any:
    """Stand-in for HostBatch._take_large: the tensor taken without being read (a constant row comes back)."""
    self.large[key] = (n, 0.0, 0.0, 0.0, 0)
    self._used = max(self._used, 1)
    if self._rows is None:
        self._rows = np.zeros((1, self.sample_cap), dtype=np.float32)
    return layout.StatsMeta(numel=n, bins=self.bins, sample_n=self.sample_cap, estimated=True)


def _one_unit_only(y: torch.Tensor, unit_dim: int, ever: torch.Tensor, rare: float, **kw: Any) -> torch.Tensor:
    """Stand-in for recorder.unit_activity: the same call on one sample instead of the whole batch."""
    return _REAL_UNIT_ACTIVITY(y.detach()[:1], unit_dim, ever, rare, **kw)


def _no_statistics(x: torch.Tensor, *, bins: int, sample_cap: int, **kw: Any) -> tuple[torch.Tensor, Any]:
    """Stand-in for recorder.tensor_stats: a vector of the right layout, nothing read."""
    n = x.numel()
    vec = torch.zeros(layout.STATS.length(bins), dtype=torch.float64)
    vec[layout.STATS.COUNT] = n
    return vec, layout.StatsMeta(numel=n, bins=bins, sample_n=min(n, sample_cap))


_REAL_UNIT_ACTIVITY = recorder.unit_activity


def _no_records(host: Any, order: Any, *args: Any, step: int, **kw: Any) -> StepRecord:
    """Stand-in for recorder.decode_step: a record without layers or parameters (nothing decoded, no object per
    tensor)."""
    return StepRecord(step=step, layers=(), params=())


def _keep_nothing(self: Any, record: StepRecord) -> None:
    """Stand-in for HistoryBuffer.add: the step is not kept."""


# name -> (what it shows, [(owner, attribute, stand-in)], watched with actdiag, empty hooks)
ABLATIONS: dict[str, tuple[str, list[tuple[Any, str, Any]], bool, bool]] = {
    "none": ("no monitoring", [], False, False),
    "actdiag": ("watch(every=1) as it is", [], True, False),
    "no-sample": (
        "large tensors: the one pass and the sample copy only (no sample statistics, no histograms)",
        [(host, "_estimate_rows", _head_only)],
        True,
        False,
    ),
    "no-sample-no-units": (
        "the same, and the per-unit ReLU pass on one sample",
        [(host, "_estimate_rows", _head_only), (recorder, "unit_activity", _one_unit_only)],
        True,
        False,
    ),
    "no-statistics": (
        "tensors over the sample size not read at all (a constant vector), the per-unit pass on one sample",
        [
            (recorder, "tensor_stats", _no_statistics),
            (host.HostBatch, "_take_large", _no_pass),
            (host, "_estimate_rows", _head_only),
            (recorder, "unit_activity", _one_unit_only),
        ],
        True,
        False,
    ),
    "no-records": (
        "everything measured, but no record or history built (what records and history made from the step's arrays "
        "could save at most)",
        [(recorder, "decode_step", _no_records), (history.HistoryBuffer, "add", _keep_nothing)],
        True,
        False,
    ),
    "empty-hooks": ("hooks registered where actdiag's go, doing nothing", [], False, True),
}


class _EmptyHooks:
    """Forward hooks on actdiag's modules registering a tensor hook on the output, and parameter post-accumulate
    hooks, all doing nothing; registered and removed every step, as actdiag's are at every=1."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.targets = recorder.select_modules(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.handles: list[Any] = []

    @staticmethod
    def _forward(_module: Any, _inputs: Any, output: Any) -> None:
        t = recorder.first_tensor(output)
        if t is not None and t.requires_grad:
            t.register_hook(lambda _g: None)

    def step(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = [m.register_forward_hook(self._forward) for _, m in self.targets]
        self.handles += [p.register_post_accumulate_grad_hook(lambda _p: None) for p in self.params]


def ablate(model_name: str, rounds: int, block: int, smoke: bool) -> list[str]:
    load = bench_step.workload(model_name, smoke)
    copies = []
    for name, (_, patches, watched, empty) in ABLATIONS.items():
        torch.manual_seed(0)
        model = load.build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        after: Any = None
        if watched:
            # strict: a stand-in that no longer fits what it replaces raises here, instead of switching recording
            # off for the copy and leaving a time that means nothing
            after = actdiag.watch(model, every=1, strict=True).start()
        elif empty:
            after = _EmptyHooks(model)
            after.step()
        copies.append((name, model, opt, patches, after))

    def run(i: int, n: int) -> float:
        _, model, opt, patches, after = copies[i]
        with _patched(patches):  # the stand-ins also cover the hooks registered for the next step
            return bench_step.timed_steps(model, opt, load, n, after)

    try:
        times = _common.interleaved(len(copies), run, rounds, block, 1 if smoke else 3)
    finally:
        for _, _, _, _, after in copies:
            if hasattr(after, "close"):
                after.close()
    blocks = {c[0]: t for c, t in zip(copies, times, strict=True)}
    rows = [
        [name, what, f"{_common.median(blocks[name]) * 1e3:.1f}", _common.ratio_cell(blocks["none"], blocks[name])]
        for name, (what, *_) in ABLATIONS.items()
    ]
    return [
        f"**{model_name}**: {load.description}; {rounds} interleaved rounds x {block} steps per copy",
        "",
        *_common.markdown_table(["copy", "what it runs", "median step ms", "ratio to none (IQR)"], rows),
    ]


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn", choices=bench_step.ALL_MODELS)
    p.add_argument("--steps", type=int, default=20, help="recorded steps timed (default 20)")
    p.add_argument("--exact", action="store_true", help="exact=True instead of the every=1 default (estimated)")
    p.add_argument("--malloc-fixed", action="store_true", help="fix glibc's mmap/trim thresholds, as bench_step.py")
    p.add_argument("--smoke", action="store_true", help="a tiny model and 2 steps: checks the script, times nothing")
    p.add_argument("--ablate", action="store_true", help="time copies with parts stubbed out (see the docstring)")
    p.add_argument("--rounds", type=int, default=5, help="--ablate: interleaved rounds (default 5)")
    p.add_argument("--block", type=int, default=15, help="--ablate: steps per copy per round (default 15)")
    args = p.parse_args(argv)
    steps = 2 if args.smoke else args.steps
    if steps < 1:
        p.error("--steps must be at least 1")
    if args.malloc_fixed and not _common.fix_malloc():
        print("[profile] --malloc-fixed: no mallopt here; the allocator keeps its defaults", file=sys.stderr)
    if args.ablate:
        rounds, block = (2, 1) if args.smoke else (args.rounds, args.block)
        if rounds < 1 or block < 1:
            p.error("--rounds and --block must be at least 1")
        lines = ablate(args.model, rounds, block, args.smoke)
    else:
        lines = profile(args.model, steps, True if args.exact else None, args.smoke)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
