"""Count the ATen ops that actdiag adds to a recorded training step on the device path (CUDA's code, run on the CPU
with `path="device"`). On a GPU every op that is not a view is a kernel launch, and each costs the host several
microseconds whatever the tensor's size: for a model with hundreds of measured tensors the launches, not the
arithmetic, can set what a recorded step costs. This is the one GPU figure that needs no GPU.

    python bench/count_ops.py                      # mlp, cnn and GPT-2 small's layout
    python bench/count_ops.py --models gpt --write BENCHMARKS.md
    python bench/count_ops.py --smoke              # seconds; what tests/bench/test_bench_smoke.py runs
    python bench/count_ops.py --fused --write BENCHMARKS.md   # the fused Triton kernel's launches (needs triton)
    python bench/count_ops.py --fused --breakdown --models mlp  # and where the recorder's ops go, to stderr

Op counts do not depend on batch or sequence sizes, so the GPT row uses GPT-2 small's layout (12 layers, d=768,
12 heads, vocab 50257, untied head) at batch 1 and 128 tokens. Views (reshape, select, slice, detach) are ATen ops
too but launch nothing; the table counts them apart.

`--fused` counts what the fused kernel (`actdiag.hooks.fused`) would launch for the same tensors, on the exact path
(`accuracy="exact"`): the tensors a recorded step measures are captured where the recorder measures them, and the ops
the recorder spends measuring them (its `_put_stats` and the end-of-step batch) are counted apart, to be replaced by the
fused path's. A Triton launch is not an ATen op: `fused._launch` is wrapped to count them, and on the CPU the kernels
are counted, not run (launches are decided on the host before any kernel runs, so the count is the GPU's). Three ways to
use the kernel are counted: each tensor measured alone in its hook, the device batch's way (a small tensor copied
into a row in its hook, all rows measured by one call when the step ends; large tensors alone) and the recorder's own
path with the kernel (ACTDIAG_FUSED=1: the step's small tensors in one call of its device batch, large ones alone in
`tensor_stats`). Bytes read per element follow from the kernel's design: two reads of each element (moments and exponent
histogram, then the linear histogram), the programs' partials (`fused.PARTIAL_BYTES` for each of a tensor's
`fused.programs(n)` programs, written once and read once), and one more read of a non-contiguous tensor made contiguous
(its copy is then read twice).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import _common  # noqa: I001 - puts the checkout on sys.path before actdiag is imported
import bench_step
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import actdiag
from actdiag.hooks.stats import tensor_stats
from actdiag.monitor import DEFAULT_EVERY
from actdiag.records import measured_stats

# Ops that allocate without writing (no kernel on a GPU); the --fused counts leave them out.
_ALLOCS = {"empty", "empty_strided", "new_empty", "new_empty_strided"}
# Ops that return a view of their input (no kernel, no allocation).
_VIEWS = {"detach", "view", "_unsafe_view", "reshape", "select", "slice", "alias", "as_strided", "expand", "t",
          "unsqueeze", "squeeze", "permute", "transpose", "unbind", "split", "lift_fresh"}  # fmt: skip


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.views = 0
        self.inside = 0  # > 0 while a wrapped part of the recorder runs (see _counted_part)
        self.part_ops = 0  # ops made inside it
        self.allocs = 0  # ops that are allocations (counted in `ops` too)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in _VIEWS:
            self.views += 1
        else:
            self.ops += 1
            self.part_ops += self.inside > 0
            self.allocs += name in _ALLOCS
        return func(*args, **(kwargs or {}))


def _gpt2_layout(smoke: bool, device: str = "cpu") -> bench_step.Workload:
    vocab, ctx, d, layers, heads = (64, 8, 16, 1, 2) if smoke else (50257, 128, 768, 12, 12)
    idx = torch.randint(0, vocab, (1, ctx + 1), generator=torch.Generator().manual_seed(1)).to(device)
    inp, tgt = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    return bench_step.Workload(
        "gpt",
        f"GPT-2 small's layout ({layers} layers, d={d}, {heads} heads, vocab {vocab}) at batch 1 x {ctx} tokens",
        lambda: bench_step.GPT(vocab, ctx, d, layers, heads).to(device),
        inp,
        lambda out: F.cross_entropy(out.reshape(-1, vocab), tgt.reshape(-1)),
        torch.device(device),
    )


class _ByPart(_Counter):
    """`_Counter` that also counts the launching ops by the actdiag function that dispatched them (the innermost
    frame under actdiag/ of the stack), for `--breakdown`: slow, a stack walk per op."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name not in _VIEWS and name not in _ALLOCS:
            where = "the model and optimizer"
            for frame in reversed(traceback.extract_stack()[:-1]):
                if f"{os.sep}actdiag{os.sep}" in frame.filename and "functional.py" not in frame.filename:
                    where = f"{Path(frame.filename).stem}.{frame.name}"
                    break
            self.parts[(where, name)] += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def counted(fn: Callable[[], Any]) -> tuple[int, int]:
    """(ATen ops that are not views, views) that one call of `fn` dispatches: on a GPU the first are (at least) one
    kernel launch each."""
    with _Counter() as c:
        fn()
    return c.ops, c.views


def launched(fn: Callable[[], Any], parts: Counter[tuple[str, str]] | None = None) -> int:
    """ATen ops of one call of `fn` that launch a kernel on a GPU: neither views nor allocations. With `parts`, they
    are also counted there by (actdiag function, op) (`_ByPart`)."""
    with _Counter() if parts is None else _ByPart() as c:
        fn()
    if parts is not None and isinstance(c, _ByPart):
        parts.update(c.parts)
    return c.ops - c.allocs


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


# ---------------------------------------------------------------------------------------------------- --fused
@contextlib.contextmanager
def _fused_launches(run: bool) -> Iterator[list[str]]:
    """Count the fused kernel's launches (the kernels' names, in order); `run=False` counts without running them
    (no GPU: the kernels would need Triton's interpreter, far too slow for a whole model's tensors)."""
    from unittest import mock

    from actdiag.hooks import fused

    launches: list[str] = []
    real = fused._launch

    def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        name = getattr(kernel, "__name__", str(kernel))
        launches.append(name)
        if run:
            real(kernel, grid, *args, **kwargs)
        elif name == "combine_kernel":
            # Rows the recorder can decode (each tensor's as if all its values were zeros), written through numpy:
            # no ATen op, so the count stays the kernels'.
            table, rows = args[0].numpy().reshape(5, -1), args[3].numpy()
            out, numel = table[4], table[1]
            rows[out] = 0.0
            for column in ("C_COUNT", "C_ZERO", "C_LIN"):
                rows[out, kwargs[column]] = numel

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(fused, "_launch", launch))
        if not run:
            names = ("moments_kernel", "combine_kernel", "linear_kernel")
            stack.enter_context(mock.patch.object(fused, "_kernels", lambda device: names))
        yield launches


def _counted_part(counter: _Counter, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        counter.inside += 1
        try:
            return fn(*args, **kwargs)
        finally:
            counter.inside -= 1

    return wrapped


def count_fused(load: bench_step.Workload, run: bool, breakdown: bool = False) -> dict[str, Any]:
    """One recorded step on the exact path (every=1, accuracy="exact"): its ops apart from measuring the tensors, the
    tensors it measures, and the fused path's ops and launches for them, both ways (module docstring)."""
    from unittest import mock

    from actdiag.hooks import fused

    torch.manual_seed(0)
    model = load.build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bench_step.train_step(model, opt, load)
    plain = counted(lambda: bench_step.train_step(model, opt, load))
    captured: list[torch.Tensor] = []
    with actdiag.watch(model, every=1, accuracy="exact") as monitor:
        rec = monitor.recorder
        rec.path = "device"
        for _ in range(2):
            bench_step.train_step(model, opt, load)
            monitor.step()
        counter = _Counter()
        put, finish = rec._put_stats, rec._device_batch.finish

        def put_stats(key: Any, t: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            put(key, t, *args, **kwargs)
            if key not in rec._aliases:  # an alias is a tensor measured already: nothing to compute
                captured.append(t.detach())

        rec._put_stats = _counted_part(counter, put_stats)
        rec._device_batch.finish = _counted_part(counter, finish)
        with counter:
            bench_step.train_step(model, opt, load)
            monitor.step()
        sample_cap = rec.sample_cap
    measuring = counter.part_ops
    rest = counter.ops - plain[0] - measuring
    supported = [t for t in captured if fused.fused_supported(t)]
    others = [t for t in captured if not fused.fused_supported(t)]
    other_ops = launched(lambda: [tensor_stats(t, path="device") for t in others]) if others else 0

    def alone() -> None:
        for t in supported:
            fused.fused_stats([t])

    def batched() -> None:
        small = [t.reshape(-1) for t in supported if t.numel() <= sample_cap]
        if small:  # the hook's copy into a row, then one call for every row when the step ends
            buf = torch.empty((len(small), sample_cap), dtype=torch.float32, device=small[0].device)
            views = []
            for k, t in enumerate(small):
                buf[k, : t.numel()].copy_(t)
                views.append(buf[k, : t.numel()])
            fused.fused_stats(views)
        for t in supported:
            if t.numel() > sample_cap:
                fused.fused_stats([t])

    ways = {}
    with _fused_launches(run) as launches:
        for name, fn in (("alone", alone), ("batched", batched)):
            fn()  # the tables planned and cached, as from the second recorded step on
            launches.clear()
            ops = launched(fn)
            ways[name] = (ops, len(launches))
    with mock.patch.dict(os.environ, {fused.ENV_SWITCH: "1"}), _fused_launches(run) as launches:
        plain_launched = launched(lambda: bench_step.train_step(model, opt, load))
        with actdiag.watch(model, every=1, accuracy="exact") as monitor:
            monitor.recorder.path = "device"
            for _ in range(2):  # the tables planned, the buffers grown
                bench_step.train_step(model, opt, load)
                monitor.step()
            launches.clear()
            parts: Counter[tuple[str, str]] | None = Counter() if breakdown else None
            ops = launched(lambda: (bench_step.train_step(model, opt, load), monitor.step()), parts)
        ways["recorder"] = (ops - plain_launched, len(launches))
        if parts is not None:
            parts.update(("fused._launch", name) for name in launches)
    elems = sum(t.numel() for t in supported)
    copied = sum(t.numel() for t in supported if not t.is_contiguous())
    programs = sum(fused.programs(t.numel()) for t in supported)
    read = 2 * elems * 4 + copied * 4 + programs * fused.PARTIAL_BYTES
    return {
        "plain": plain[0],
        "rest": rest,
        "measuring": measuring,
        "tensors": len(captured),
        "unsupported": (len(others), other_ops),
        "ways": ways,
        "bytes_per_element": read / max(elems, 1),
        "parts": parts,
    }


def _breakdown(model: str, parts: Counter[tuple[str, str]]) -> str:
    """The recorded step's launching ops (the plain step's included) by function, most first, each with its ops."""
    by_fn: dict[str, Counter[str]] = {}
    for (where, op), n in parts.items():
        by_fn.setdefault(where, Counter())[op] += n
    lines = [f"{model}: a recorded step's ATen ops and Triton launches by where they are made (--breakdown)"]
    for where, ops in sorted(by_fn.items(), key=lambda item: -item[1].total()):
        lines.append(f"{ops.total():7d}  {where}: " + ", ".join(f"{op} {n}" for op, n in ops.most_common()))
    return "\n".join(lines)


def fused_main(args: argparse.Namespace, argv: Sequence[str] | None) -> list[str]:
    from actdiag.hooks import fused

    if fused._triton() is None:
        raise SystemExit("--fused needs triton: pip install 'actdiag[gpu]'")
    run = torch.cuda.is_available() and args.device == "cuda"
    header = ["model", "plain step: ops", "tensors measured", "actdiag's ops today", "of which measuring",
              "fused, each tensor alone: ATen ops + Triton launches", "per tensor", "actdiag's ops with it",
              "fused, batched: ATen ops + Triton launches", "per tensor", "actdiag's ops with it",
              "bytes read per float32 element", "the recorder with it (ACTDIAG_FUSED=1): ATen ops + Triton launches",
              "per tensor"]  # fmt: skip
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        if name not in ("mlp", "cnn", "gpt", "deep"):
            raise ValueError(f"unknown model {name!r}; choose from mlp, cnn, gpt, deep")
        # Run on CUDA, the models train there too (the plain step's ops are then the GPU's: AdamW's foreach path).
        dev = "cuda" if run else "cpu"
        load = _gpt2_layout(args.smoke, dev) if name == "gpt" else bench_step.workload(name, args.smoke, dev)
        got = count_fused(load, run, args.breakdown)
        if args.breakdown:
            print(_breakdown(name, got["parts"]), file=sys.stderr, flush=True)
        n, plain, rest = got["tensors"], got["plain"], got["rest"]
        cells = [f"{name}: {load.description}", str(plain), str(n), str(rest + got["measuring"]),
                 str(got["measuring"])]  # fmt: skip
        for way in ("alone", "batched"):
            ops, launches = got["ways"][way]
            total = ops + launches + got["unsupported"][1]
            cells += [
                f"{ops} + {launches}",
                f"{total / max(n, 1):.2f}",
                f"{rest + total} ({(rest + total) / plain:.2f}x)",
            ]
        cells.append(f"{got['bytes_per_element']:.2f}")
        ops, launches = got["ways"]["recorder"]
        cells += [f"{ops} + {launches} ({(ops + launches) / plain:.2f}x)", f"{(ops + launches) / max(n, 1):.2f}"]
        rows.append(cells)
        print(" | ".join(cells), file=sys.stderr, flush=True)
    how = "run on CUDA" if run else "counted on the host, not run"
    lines = [f"Command: `{_common.command(__file__, argv)}` (kernels {how})", ""]
    lines += _common.machine_lines()[3:4]
    lines += ["", *_common.markdown_table(header, rows)]
    return _common.publish(lines, args.write, "bench:ops-fused")


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models",
        default="mlp,cnn,gpt,deep",
        help="comma-separated: mlp, cnn, gpt (GPT-2 small's layout), deep (bench_step's deep narrow MLP)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny models")
    p.add_argument("--write", type=Path, default=None, help="replace the op-count table in this Markdown file")
    p.add_argument("--fused", action="store_true", help="count the fused Triton kernel's launches (needs triton)")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="with --fused: print where the recorder's ops go (by actdiag function) to stderr",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="with --fused: cuda runs the kernels while counting (the counts are the same)")  # fmt: skip
    args = p.parse_args(argv)
    if args.fused:
        return fused_main(args, argv)
    header = ["model", "plain step: ops (+ views)", "tensors measured", "interval", "actdiag's ops (+ views)",
              "ops per tensor", "ops vs the plain step"]  # fmt: skip
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        if name not in ("mlp", "cnn", "gpt", "deep"):  # deep: bench_step's deep narrow MLP (~1600 small tensors)
            raise ValueError(f"unknown model {name!r}; choose from mlp, cnn, gpt, deep")
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
