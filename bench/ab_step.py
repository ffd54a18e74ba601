"""A recorded step's cost at two revisions of actdiag, measured side by side in one process.

    python bench/ab_step.py --baseline a77e8cb --model cnn --malloc-fixed    # watch(every=1), 16 rounds x 10 steps
    python bench/ab_step.py --baseline a77e8cb --model gpt --exact --rounds 20
    python bench/ab_step.py --baseline HEAD --model cnn --sample-cap 4096   # the same code, a smaller sample
    python bench/ab_step.py --smoke                   # seconds; what tests/bench/test_bench_smoke.py runs

The `actdiag` package as it was at the baseline revision is taken out of git (`git archive`) into a temporary folder
and imported under another name, `actdiag_baseline`, so that both versions watch their own copy of the model in the
same process. Four copies train in turns, interleaved as in bench_step.py (blocks of `--block` steps, the order
rotating each round): unmonitored, a second unmonitored copy (the control: the method's noise), watched by the
baseline and watched by this checkout. Two separate runs of bench_step.py on this shared machine differ by up to ~0.08
in their every=1 ratios; here drift and other people's jobs hit both versions alike, so a change's effect is not
confounded with the machine's speed moving between runs.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import _common  # also puts the checkout on sys.path
import bench_step
import torch

import actdiag
from actdiag.hooks import recorder

BASELINE = "actdiag_baseline"
# Where the package names itself: `from actdiag.x import`, `import actdiag`, and module paths in strings ("actdiag.x").
_SELF = re.compile(r"\bfrom actdiag(?=[. ])|\bimport actdiag\b|(?<=[\"'])actdiag(?=\.)")


def load_baseline(rev: str) -> ModuleType:
    """The `actdiag` package at git revision `rev`, imported as `actdiag_baseline`."""
    try:
        tar = subprocess.run(
            ["git", "-C", str(_common.ROOT), "archive", "--format=tar", rev, "actdiag"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise SystemExit(
            f"ab_step: cannot take actdiag/ out of git at {rev!r}: {detail.decode().strip() or exc}"
        ) from None
    root = Path(tempfile.mkdtemp(prefix="actdiag-ab-"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(root, filter="data")
    package = root / BASELINE
    (root / "actdiag").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        path.write_text(_SELF.sub(lambda m: m.group(0).replace("actdiag", BASELINE), text))
    sys.path.insert(0, str(root))
    module = importlib.import_module(BASELINE)
    # While recording, a recorder holds torch.compile's force-eager stance through a reference count shared by every
    # watch in the process; two copies of the package would each count alone and give the stance back out of order,
    # leaving it set. The baseline shares this checkout's count (revisions before it had none to share).
    base_recorder = importlib.import_module(f"{BASELINE}.hooks.recorder")
    if hasattr(base_recorder, "_EAGER"):
        base_recorder._EAGER = recorder._EAGER
    return module


def run(args: argparse.Namespace) -> list[str]:
    base_pkg = load_baseline(args.baseline)
    load = bench_step.workload(args.model, args.smoke)
    copies: list[tuple[str, Any, Any, Any]] = []
    mine = "this checkout" if args.sample_cap is None else f"this checkout, sample_cap={args.sample_cap}"
    for label, pkg in (("none", None), ("none-copy", None), (args.baseline, base_pkg), (mine, actdiag)):
        torch.manual_seed(0)
        model = load.build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        kwargs: dict[str, Any] = {"every": args.every}
        if args.exact:  # revisions before watch(accuracy=) took exact=True
            new = pkg is not None and "accuracy" in inspect.signature(pkg.watch).parameters
            kwargs.update({"accuracy": "exact"} if new else {"exact": True})
        if pkg is actdiag and args.sample_cap is not None:
            kwargs["sample_cap"] = args.sample_cap
        mon = pkg.watch(model, **kwargs).start() if pkg is not None else None
        copies.append((label, model, opt, mon))

    def block(i: int, n: int) -> float:
        _, model, opt, mon = copies[i]
        return bench_step.timed_steps(model, opt, load, n, mon)

    try:
        times = _common.interleaved(len(copies), block, args.rounds, args.block, args.warmup)
    finally:
        for *_, mon in copies:
            if mon is not None:
                mon.close()
    rows = [
        [label, f"{_common.median(t) * 1e3:.1f}", _common.ratio_cell(times[0], t)]
        for (label, *_), t in zip(copies, times, strict=True)
    ]
    what = f"watch(every={args.every}, exact={args.exact})"
    return [
        f"**{args.model}**: {load.description}; {what}; {args.rounds} interleaved rounds x {args.block} steps per copy",
        "",
        *_common.markdown_table(["copy", "median step ms", "ratio to none (IQR)"], rows),
    ]


def main(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="HEAD", help="git revision to compare with (default HEAD)")
    p.add_argument("--model", default="cnn", choices=bench_step.ALL_MODELS)
    p.add_argument("--every", type=int, default=1, help="watch(every=...) for both versions (default 1)")
    p.add_argument("--exact", action="store_true", default=None, help="watch(exact=True) for both versions")
    p.add_argument(
        "--sample-cap",
        type=int,
        default=None,
        help="watch(sample_cap=N) for this checkout only (the baseline keeps its default): what another sample costs",
    )
    p.add_argument("--rounds", type=int, default=16, help="interleaved rounds (default 16)")
    p.add_argument("--block", type=int, default=10, help="steps per copy per round (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="steps per copy before timing (default 3)")
    p.add_argument("--malloc-fixed", action="store_true", help="fix glibc's mmap/trim thresholds, as bench_step.py")
    p.add_argument("--smoke", action="store_true", help="a tiny model and 2 short rounds: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.block, args.warmup = 2, 1, 1
    if min(args.rounds, args.block, args.every) < 1 or args.warmup < 0:
        p.error("--rounds, --block and --every must be at least 1, --warmup at least 0")
    if args.malloc_fixed and not _common.fix_malloc():
        print("[ab] --malloc-fixed: no mallopt here; the allocator keeps its defaults", file=sys.stderr)
    lines = run(args)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
