"""The terminal summary: the ranked findings as a table (layer, what, evidence, fix) and a one-line verdict.

This module formats; it never prints. The caller (the command line) decides where the text goes. Colour is used
only when asked for, and `use_color()` says when to ask: on a terminal, unless NO_COLOR is set (no-color.org).
With the optional `rich` package the table is drawn by rich on a terminal; without it, or when piped, a plain
text table is drawn, so logs and CI output stay readable and free of escape codes.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from typing import IO, Any

from actdiag.formatting import format_number
from actdiag.records import Finding, Fix, Report

SEVERITY_COLOR = {"error": "red", "warning": "yellow", "info": "cyan"}
_ANSI = {"red": "31", "yellow": "33", "cyan": "36", "green": "32", "bold": "1", "dim": "2"}
DEFAULT_WIDTH = 100
MAX_SNIPPETS = 2


def use_color(stream: IO[Any] | None) -> bool:
    """Colour on a terminal only, and never when NO_COLOR is set to a non-empty value."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


def terminal_width(stream: IO[Any] | None = None) -> int:
    """The terminal's width, or DEFAULT_WIDTH when the output is not a terminal (stable, diff-friendly logs)."""
    if stream is not None and _isatty(stream):
        return max(60, shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns)
    return DEFAULT_WIDTH


def _paint(text: str, style: str, color: bool) -> str:
    if not color or style not in _ANSI:
        return text
    return f"\x1b[{_ANSI[style]}m{text}\x1b[0m"


def format_evidence(evidence: Mapping[str, Any], limit: int = 4, sep: str = ", ") -> str:
    items = list(evidence.items())
    text = sep.join(f"{k}={format_number(v)}" for k, v in items[:limit])
    return text + (f"{sep}..." if len(items) > limit else "")


def format_fix(fixes: Sequence[Fix]) -> str:
    if not fixes:
        return "-"
    fix = fixes[0]
    mark = {True: " (verified: it helps)", False: " (tried: it did not help)", None: ""}[fix.verified]
    more = f" (+{len(fixes) - 1} more)" if len(fixes) > 1 else ""
    return f"{fix.text}{mark}{more}"


def _what(f: Finding) -> str:
    return f"{f.code}\n{f.message}"


def _layer(f: Finding, types: Mapping[str, str] | None = None) -> str:
    """The layer's name, with its type when known ("14 (Linear)" says more than "14" in a Sequential)."""
    if f.layer is None:
        return "(model)"
    kind = (types or {}).get(f.layer)
    name = f"{f.layer} ({kind})" if kind else f.layer
    if f.related:
        name += f"\n+{len(f.related)} more"
    return name


def _counts(findings: Sequence[Finding]) -> str:
    parts = []
    for sev in ("error", "warning", "info"):
        n = sum(1 for f in findings if f.severity == sev)
        if n:
            parts.append(f"{n} {sev}{'s' if n != 1 else ''}")
    return ", ".join(parts)


def verdict(report: Report, color: bool = False) -> str:
    """One line: what was run and whether anything is wrong, starting with the most severe finding."""
    steps = f"{report.run.steps} step{'s' if report.run.steps != 1 else ''}"
    n = len(report.layers)
    ran = f"{report.model.name}, {n} layer{'s' if n != 1 else ''}, {steps}"
    if not report.findings:
        return _paint("verdict: no problems found", "green", color) + f" in {ran}"
    top = report.findings[0]
    at = f" at {top.layer}" if top.layer is not None else ""
    head = _paint(f"verdict: {_counts(report.findings)}", SEVERITY_COLOR.get(top.severity, "bold"), color)
    return f"{head} in {ran}; start with {top.code}{at}"


def _wrap(text: str, width: int) -> list[str]:
    """Wrap each line of `text` to `width` (explicit newlines separate items, e.g. one evidence value per line)."""
    out: list[str] = []
    for para in text.split("\n"):
        out += textwrap.wrap(para, width=max(width, 4), break_long_words=True, break_on_hyphens=False) or [""]
    return out


def _plain_table(findings: Sequence[Finding], width: int, color: bool, types: Mapping[str, str]) -> str:
    header = ("#", "severity", "layer", "what", "evidence", "fix")
    rows = [
        (str(i), f.severity, _layer(f, types), _what(f), format_evidence(f.evidence, sep="\n"), format_fix(f.fixes))
        for i, f in enumerate(findings, 1)
    ]
    gap = 2

    def longest(col: int, cap: int) -> int:
        return min(max(len(header[col]), *(len(ln) for r in rows for ln in r[col].split("\n"))), cap)

    w_num, w_sev, w_layer, w_evid = longest(0, 4), longest(1, 8), longest(2, 24), longest(4, 24)
    rest = max(width - w_num - w_sev - w_layer - w_evid - 5 * gap, 30)
    w_what = max(rest * 55 // 100, 16)
    w_fix = max(rest - w_what, 12)
    widths = (w_num, w_sev, w_layer, w_what, w_evid, w_fix)

    def line(cells: Sequence[str], styles: Sequence[str | None]) -> list[str]:
        wrapped = [_wrap(c, w) for c, w in zip(cells, widths)]
        out = []
        for k in range(max(len(c) for c in wrapped)):
            parts = []
            for col, (cell, w) in enumerate(zip(wrapped, widths)):
                text = cell[k] if k < len(cell) else ""
                pad = text.ljust(w) if col < len(widths) - 1 else text
                style = styles[col]
                parts.append(_paint(pad, style, color) if style and text else pad)
            out.append((" " * gap).join(parts).rstrip())
        return out

    lines = line(header, ["bold"] * len(header))
    lines.append((" " * gap).join("-" * w for w in widths))
    for f, row in zip(findings, rows):
        lines += line(row, [None, SEVERITY_COLOR.get(f.severity), "bold", None, None, None])
    return "\n".join(lines)


def _rich_table(findings: Sequence[Finding], width: int, types: Mapping[str, str]) -> str | None:
    """The table drawn by rich (optional extra), or None when rich is not installed."""
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        return None
    import io

    table = Table(show_header=True, header_style="bold", expand=False, show_lines=False)
    for col, kw in (
        ("#", {"justify": "right", "no_wrap": True}),
        ("severity", {"no_wrap": True}),
        ("layer", {"style": "bold", "max_width": 28, "overflow": "fold"}),
        ("what", {"ratio": 4, "overflow": "fold"}),
        ("evidence", {"ratio": 2, "overflow": "fold"}),
        ("fix", {"ratio": 3, "overflow": "fold"}),
    ):
        table.add_column(col, **kw)
    for i, f in enumerate(findings, 1):
        table.add_row(
            str(i),
            Text(f.severity, style=SEVERITY_COLOR.get(f.severity, "")),
            Text(_layer(f, types)),
            Text(_what(f)),
            Text(format_evidence(f.evidence, sep="\n")),
            Text(format_fix(f.fixes)),
        )
    buf = io.StringIO()
    Console(file=buf, width=width, force_terminal=True, color_system="standard", no_color=False).print(table)
    return buf.getvalue().rstrip("\n")


def findings_table(
    findings: Sequence[Finding],
    *,
    width: int = DEFAULT_WIDTH,
    color: bool = False,
    types: Mapping[str, str] | None = None,
) -> str:
    """The ranked findings as a table; `types` maps layer names to module types. On a terminal (color=True) rich
    draws it when installed."""
    if not findings:
        return ""
    types = types or {}
    if color:
        drawn = _rich_table(findings, width, types)
        if drawn is not None:
            return drawn
    return _plain_table(findings, width, color, types)


def fix_snippets(findings: Sequence[Finding], limit: int = MAX_SNIPPETS, color: bool = False) -> str:
    """The pasteable code of the first fix of the top findings."""
    blocks = []
    for f in findings:
        fix = next((x for x in f.fixes if x.snippet), None)
        if fix is None:
            continue
        at = f" at {f.layer}" if f.layer is not None else ""
        title = _paint(f"fix for {f.code}{at} ({fix.code}):", "bold", color)
        blocks.append(title + "\n" + textwrap.indent(fix.snippet.rstrip(), "    "))
        if len(blocks) >= limit:
            break
    return "\n\n".join(blocks)


def format_summary(
    report: Report, *, width: int = DEFAULT_WIDTH, color: bool = False, quiet: bool = False, source: str = ""
) -> str:
    """The whole terminal summary: a header, the findings table, fix snippets, and the verdict last (so it is the
    line a reader sees at the bottom of a CI log). `source` says where the model came from, e.g.
    "model.py: build_model()". `quiet` keeps only the verdict."""
    if quiet:
        return verdict(report, color)
    params = f"{report.model.parameters:,} parameters"
    origin = f" from {source}" if source else ""
    head = _paint(f"actdiag: {report.model.name}", "bold", color) + f"{origin} ({params}, on {report.run.device})"
    parts = [head]
    if report.findings:
        types = {layer.name: layer.type for layer in report.layers}
        parts.append(findings_table(report.findings, width=width, color=color, types=types))
        snippets = fix_snippets(report.findings, color=color)
        if snippets:
            parts.append(snippets)
    parts.append(verdict(report, color))
    return "\n\n".join(parts)


class ProgressBar:
    """A one-line progress bar for multi-step runs, drawn on `stream` only when it is a terminal (so a piped or
    logged run stays quiet). Use as the `progress(done, total)` callback of `actdiag.inspect`."""

    def __init__(self, stream: IO[str], label: str = "steps", width: int = 30, enabled: bool | None = None) -> None:
        self.stream = stream
        self.label = label
        self.width = width
        self.enabled = _isatty(stream) if enabled is None else enabled
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 1:
            return
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done}/{total} {self.label}")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            # Blank the bar's line rather than leave it above the summary.
            self.stream.write("\r" + " " * (self.width + 24) + "\r")
            self.stream.flush()
            self._drawn = False


def _isatty(stream: IO[Any]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
