"""Helpers shared by the benchmark scripts: machine description, memory probes, table formatting."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout, without installing actdiag
    sys.path.insert(0, str(ROOT))


def with_threads(threads: int, fn: Callable[[], T]) -> T:
    """Run `fn` with torch using `threads` threads (0: torch's choice), then put the count back: a script's main()
    also runs inside pytest, and must leave the process as it found it."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    found = re.search(r"model name\s*:\s*(.+)", text)
    return found.group(1).strip() if found else platform.machine()


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = out.stdout.strip() or "unknown"
    return rev + ("+dirty" if dirty.stdout.strip() else "")


def machine_lines(extra: Sequence[str] = ()) -> list[str]:
    import numpy
    import torch

    import actdiag

    try:
        load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "n/a"
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()}",
        f"- GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CPU only)'}",
        f"- OS: {platform.platform()}; Python {platform.python_version()}",
        f"- torch {torch.__version__}, numpy {numpy.__version__}, actdiag {actdiag.__version__} (git {git_revision()})",
        f"- load average at start: {load}",
    ]
    lines.extend(extra)
    return lines


# --------------------------------------------------------------------------------------------- memory (Linux)
def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(field + r":\s+(\d+)\s+kB", text)
    return int(found.group(1)) if found else None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0); False where not supported."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)  # give freed heap back first, so the baseline is what is really in use
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def minor_faults() -> int | None:
    """Minor page faults of this process so far (getrusage); None where the platform has no such count."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# glibc's mallopt parameters (malloc.h): freed memory above the trim threshold at the heap's top goes back to the
# kernel; allocations above the mmap threshold get fresh pages of their own. Both thresholds move with what the
# process frees unless they are set.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
FIXED_MALLOC_BYTES = 32 << 20  # glibc's upper bound for the mmap threshold on 64-bit


def fix_malloc(threshold: int = FIXED_MALLOC_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds, so that memory a step frees is kept for the next step instead of being
    returned to the kernel and faulted in again. False where this is not glibc or mallopt refused."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))


# --------------------------------------------------------------------------------------------- numbers
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        v = xs[0] if xs else float("nan")
        return v, v
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def interleaved(
    count: int, run_block: Callable[[int, int], float], rounds: int, block: int, warmup: int
) -> list[list[float]]:
    """Time `count` copies in turns: `run_block(i, n)` trains copy i for n steps and returns seconds per step. Each
    copy first runs `warmup` steps; then each round runs a block of `block` steps of every copy, in an order that
    rotates each round, so drift and other people's jobs hit all copies alike. Returns each copy's block times."""
    times: list[list[float]] = [[] for _ in range(count)]
    for i in range(count):
        if warmup:
            run_block(i, warmup)
    for r in range(rounds):
        for j in range(count):
            i = (r + j) % count
            times[i].append(run_block(i, block))
    return times


def ratio_cell(base: Sequence[float], times: Sequence[float]) -> str:
    """Median and IQR of the per-round ratios times / base, as "1.234 (1.200-1.250)"."""
    ratios = [b / a for a, b in zip(base, times, strict=True)]
    lo, hi = quartiles(ratios)
    return f"{median(ratios):.3f} ({lo:.3f}-{hi:.3f})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out.extend("| " + " | ".join(r) + " |" for r in rows)
    return out


def command(script: str, argv: Sequence[str] | None) -> str:
    """How a script was run, for its table: `python bench/SCRIPT ARGS` (argv None: the process's own arguments)."""
    shown = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "bench/" + Path(script).name, *shown])


def publish(lines: Sequence[str], path: Path | None, marker: str) -> list[str]:
    """Print a script's table and, with `--write PATH`, put it between its markers in PATH; returns the lines."""
    print("\n".join(lines))
    if path is not None:
        replace_section(path, marker, lines)
    return list(lines)


def replace_section(path: Path, marker: str, body: Sequence[str]) -> None:
    """Replace the text between `<!-- marker -->` and `<!-- /marker -->` in `path` (appending it if absent)."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    block = "\n".join([start, *body, end])
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        before = text[: text.index(start)]
        after = text[text.index(end) + len(end) :]
        text = before + block + after
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)
