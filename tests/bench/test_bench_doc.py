"""BENCHMARKS.md keeps the markers that the scripts' `--write` replaces, so regenerating a table updates it in place
instead of appending a second copy at the end of the file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The sections each script writes with `--write BENCHMARKS.md` (bench_step.py writes two, on the CPU or on a GPU).
WRITTEN = {
    "bench_step.py": (
        "bench:steps",
        "bench:targets",
        "bench:gpu-steps",
        "bench:gpu-targets",
        "bench:pertensor-steps",
        "bench:pertensor-targets",
    ),  # fmt: skip
    "bench_reports.py": ("bench:reports",),
    "bench_kernel.py": ("bench:kernel",),
    "count_ops.py": ("bench:ops", "bench:ops-fused"),
    "bench_fused.py": ("bench:gpu-fused",),
}


def test_every_written_section_has_one_pair_of_markers() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    for script, markers in WRITTEN.items():
        source = (ROOT / "bench" / script).read_text()
        for marker in markers:
            assert f'"{marker}"' in source, f"{script} no longer writes {marker}"
            start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
            assert text.count(start) == 1 and text.count(end) == 1, f"{marker}: one pair of markers"
            assert text.index(start) < text.index(end), f"{marker}: markers out of order"


def test_no_section_is_left_unowned() -> None:
    text = (ROOT / "BENCHMARKS.md").read_text()
    owned = {m for markers in WRITTEN.values() for m in markers}
    found = set(re.findall(r"<!-- (bench:[a-z-]+) -->", text))
    assert found == owned, f"markers no script writes, or written sections missing: {found ^ owned}"
