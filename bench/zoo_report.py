"""Run `actdiag.watch` on every case of the training zoo (tests/training_zoo.py) and print what it found.

    python bench/zoo_report.py                 # every case, a Markdown table and the summary line
    python bench/zoo_report.py dies_mid_run    # only the named cases

Columns: the case, its planted label (code@layer, the step it shows at, the acceptable fixes), what actdiag
reported (code@layer#first_step/pass[fixes] for warnings and errors; infos in brackets), and the verdict: for a planted
case whether a finding matched the label (and if not, why the closest one did not), for a healthy control the false
alarms (any warning or error, or a code the control must not have). The last line is the figure to quote:
detected / planted, false alarms / healthy runs, crashes of actdiag itself. Each label is proven independently of
actdiag by tests/test_training_zoo_labels.py.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from _common import with_threads

import actdiag
from tests.training_zoo import CASES, Case, Verdict, describe, judge


@dataclass(frozen=True)
class Row:
    case: Case
    findings: tuple[Any, ...]
    verdict: Verdict | None  # None when actdiag crashed
    error: str = ""


def watch_case(case: Case, every: int | None = None) -> tuple[Any, ...]:
    """Train the case's run under `actdiag.watch(strict=True)`; the findings at the end."""
    run = case.make()
    with actdiag.watch(run.model, every=every or case.every, strict=True) as monitor:
        run.train(monitor.step)
    return tuple(monitor.findings)


def evaluate(case: Case, every: int | None = None) -> Row:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            findings = watch_case(case, every)
    except Exception as exc:  # noqa: BLE001 - a crash is a result to report, not a reason to stop
        return Row(case, (), None, f"{type(exc).__name__}: {exc}")
    return Row(case, findings, judge(case.label, findings))


def planted(case: Case) -> str:
    label = case.label
    if label.healthy:
        return "healthy" + (f" (no {', '.join(label.absent)})" if label.absent else "")
    layers = "|".join(str(x) for x in label.layers) or "any"
    text = f"{label.code}@{layers}"
    if label.step is not None:
        text += f"#{label.step}" + (f"..{label.step + label.step_slack}" if label.step_slack else "")
    if label.pass_:
        text += f"/{label.pass_}"
    if label.fixes:
        text += f" [{'|'.join(label.fixes)}]"
    return text


def reported(row: Row) -> str:
    if row.verdict is None:
        return f"CRASH {row.error}"
    loud = [describe(f) for f in row.findings if f.severity != "info"]
    quiet = [describe(f) for f in row.findings if f.severity == "info"]
    text = " ".join(loud) or "-"
    return text + (f" ({' '.join(quiet)})" if quiet else "")


def verdict(row: Row) -> str:
    v = row.verdict
    if v is None:
        return "crash"
    if v.detected is None:
        return f"false alarm: {len(v.false_alarms)}" if v.false_alarms else "quiet"
    return "detected" if v.detected else f"missed: {v.why}"


def table(rows: Sequence[Row]) -> str:
    lines = ["| case | item | planted | actdiag reported | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r.case.name, str(r.case.label.item), planted(r.case), reported(r), verdict(r)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    plant = [r for r in rows if not r.case.label.healthy]
    healthy = [r for r in rows if r.case.label.healthy]
    found = sum(1 for r in plant if r.verdict is not None and r.verdict.detected)
    alarms = sum(1 for r in healthy if r.verdict is None or r.verdict.false_alarms)
    crashes = sum(1 for r in rows if r.verdict is None)
    return (
        f"detected {found} / {len(plant)} planted, false alarms {alarms} / {len(healthy)} healthy runs, "
        f"crashes {crashes}"
    )


def main(argv: Sequence[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--every", type=int, default=None, help="override every case's recording interval")
    args = parser.parse_args(argv)
    names = {c.name for c in CASES}
    unknown = sorted(set(args.cases) - names)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    chosen = [c for c in CASES if not args.cases or c.name in args.cases]
    # One thread: the runs are tiny, and their labels (the step a NaN appears at) assume one float sum order.
    rows = with_threads(1, lambda: [evaluate(c, args.every) for c in chosen])
    print(table(rows))
    print()
    print(summary(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
