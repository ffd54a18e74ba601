"""Time writing the reports of a long run, and the command line's start-up.

    python bench/bench_reports.py                   # 200-layer model, 1000 recorded steps
    python bench/bench_reports.py --write BENCHMARKS.md
    python bench/bench_reports.py --smoke           # seconds; what tests/bench/test_bench_smoke.py runs

A few steps of a 200-layer model are recorded for real with `actdiag.watch(every=1)`; those records are then replayed
with step numbers 0..N-1, so the figures measure the sinks and the history, not the recorder (bench_step.py times
that). Measured: the bounded history (`HistoryBuffer.add`, on the training thread in `Monitor.step()`), the
TensorBoard sink (`on_record` on the training thread, then its background writer drained by `on_close`), the HTML
and JSON reports (`save_html` / `save_json` of the final report), and the sizes on disk. Where a sink is missing
(an older checkout) its row says so instead of failing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common  # noqa: I001 - puts the checkout on sys.path before actdiag is imported
import torch
import torch.nn.functional as F
from torch import nn

import actdiag
from actdiag.history import HistoryBuffer


def build_model(layers: int, width: int) -> nn.Sequential:
    """`layers` hooked modules: Linear and Tanh alternating."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width) if i % 2 == 0 else nn.Tanh())
    return nn.Sequential(*mods)


def record_steps(model: nn.Module, width: int, steps: int) -> tuple[actdiag.Monitor, list[Any]]:
    x = torch.randn(16, width)
    y = torch.randn(16, width)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    records = []
    mon = actdiag.watch(model, every=1, max_history=512)
    with mon:
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            mon.step()
            records.append(mon.latest)
    return mon, records


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_reports(layers: int, steps: int, tmp: Path) -> tuple[list[list[str]], list[str]]:
    torch.manual_seed(0)
    model = build_model(layers, 32)
    mon, records = record_steps(model, 32, 4)
    replay = [dataclasses.replace(records[i % len(records)], step=i) for i in range(steps)]
    rows: list[list[str]] = []
    notes: list[str] = []

    buffer = HistoryBuffer(max_points=512)
    t_hist, _ = timed(lambda: [buffer.add(r) for r in replay])
    rows.append(
        [
            "history (Monitor.step, training thread)",
            f"{t_hist:.2f}",
            f"{t_hist / steps * 1e3:.2f}",
            "in memory",
        ]
    )
    # The final report of a run of `steps` recorded steps: latest step, bounded history, findings.
    mon.history_buffer = buffer
    mon.latest = replay[-1]
    mon.steps = mon.recorded_steps = steps
    t_rep, report = timed(mon.report)
    rows.append(["final report (rules + history snapshot)", f"{t_rep:.2f}", "", ""])

    try:
        from actdiag.reports.tensorboard import TensorBoardSink
    except ImportError as exc:
        notes.append(f"- TensorBoard sink not available in this checkout ({exc}); row skipped.")
    else:
        logdir = tmp / "tb"
        sink = TensorBoardSink(logdir, max_pending=steps + 1)  # nothing dropped: time the whole writer
        t_on, _ = timed(lambda: [sink.on_record(r) for r in replay])
        t_close, _ = timed(lambda: sink.on_close(report))
        rows.append(
            [
                "TensorBoard: on_record (training thread)",
                f"{t_on:.2f}",
                f"{t_on / steps * 1e3:.3f}",
                "",
            ]
        )
        rows.append(
            [
                "TensorBoard: writer thread, drained at close",
                f"{t_close:.2f}",
                f"{t_close / steps * 1e3:.2f}",
                _mb(dir_size(logdir)),
            ]
        )
        # What on_record would cost the training thread if it wrote synchronously (the writer thread's work per
        # step), on a few steps.
        sync = TensorBoardSink(tmp / "tb-sync")
        few = replay[: min(20, steps)]
        t_sync, _ = timed(lambda: [sync._write_record(r) for r in few])
        sync.on_close(report)
        rows.append(
            ["TensorBoard: the same write, if synchronous", f"{t_sync:.2f}", f"{t_sync / len(few) * 1e3:.2f}", ""]
        )

    for kind in ("html", "json"):
        path = tmp / f"report.{kind}"
        try:
            t_save, _ = timed(lambda p=path, k=kind: getattr(report, f"save_{k}")(p))  # type: ignore[misc]
        except (ImportError, NotImplementedError, AttributeError) as exc:
            notes.append(f"- {kind.upper()} report not available in this checkout ({exc}); row skipped.")
            continue
        rows.append([f"{kind.upper()} report (save_{kind})", f"{t_save:.2f}", "", _mb(path.stat().st_size)])
    try:  # the one-step report of `actdiag inspect`, for comparison
        one = actdiag.inspect(model, torch.randn(16, 32)).save_html(tmp / "inspect.html")
        rows.append(["HTML report of actdiag.inspect (one step)", "", "", _mb(one.stat().st_size)])
    except (ImportError, NotImplementedError, AttributeError) as exc:
        notes.append(f"- inspect report not available in this checkout ({exc}); row skipped.")
    return rows, notes


def cli_startup(repeats: int) -> list[list[str]]:
    """Wall and CPU time of `python -m actdiag --version` / `--help` in fresh interpreters (median of repeats)."""
    rows = []
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for args in (["--version"], ["--help"], ["inspect", "--help"]):
        walls, cpus = [], []
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "actdiag", *args], cwd=_common.ROOT, env=env, capture_output=True, check=True
            )
            walls.append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        rows.append(
            [
                f"`python -m actdiag {' '.join(args)}`",
                f"{statistics.median(walls):.3f}",
                f"{min(walls):.3f}-{max(walls):.3f}",
                f"{statistics.median(cpus):.3f}",
            ]
        )
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=200, help="hooked modules in the model (default 200)")
    p.add_argument("--steps", type=int, default=1000, help="recorded steps replayed (default 1000)")
    p.add_argument("--repeats", type=int, default=7, help="runs of each CLI start-up command (default 7)")
    p.add_argument("--smoke", action="store_true", help="6 layers, 10 steps, 1 start-up run: checks the script")
    p.add_argument("--write", type=Path, default=None, help="replace the reports table in this Markdown file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = parse_args(argv)
    if args.smoke:
        args.layers, args.steps, args.repeats = 6, 10, 1
    lines = [f"Command: `{_common.command(__file__, argv)}`", ""]
    lines += _common.machine_lines()
    lines += [
        "",
        f"**Reports**: {args.layers}-layer model (Linear(32)/Tanh alternating), {args.steps} recorded steps",
        "",
    ]
    tmp = Path(tempfile.mkdtemp(prefix="actdiag-bench-reports-"))
    try:
        rows, notes = bench_reports(args.layers, args.steps, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines += _common.markdown_table(["what", "total s", "ms per recorded step", "size on disk, MB"], rows)
    lines += ["", *notes]
    lines += ["", "**Start-up** (fresh interpreter each run; torch is not imported for these)", ""]
    lines += _common.markdown_table(
        ["command", "median wall s", "range wall s", "median CPU s"], cli_startup(args.repeats)
    )
    lines.append("")
    return _common.publish(lines, args.write, "bench:reports")


if __name__ == "__main__":
    main()
