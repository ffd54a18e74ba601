"""The terminal summary: the ranked findings as a table (layer, what, evidence, fix) and a one-line verdict.

This module formats; it never prints. The caller (the command line) decides where the text goes. Colour is used
only when asked for, and `use_color()` says when to ask: on a terminal, unless NO_COLOR is set (no-color.org).
With the optional `rich` package the table is drawn by rich on a terminal; without it, or when piped, a plain
text table is drawn, so logs and CI output stay readable and free of escape codes.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import textwrap
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

from actdiag.formatting import format_number
from actdiag.records import Finding, Fix, LayerStats, Report

if TYPE_CHECKING:
    from actdiag.reports.diff import RunDiff

SEVERITY_COLOR = {"error": "red", "warning": "yellow", "info": "cyan"}
_ANSI = {"red": "31", "yellow": "33", "cyan": "36", "green": "32", "bold": "1", "dim": "2"}
DEFAULT_WIDTH = 100
MAX_SNIPPETS = 2
# A column grows to hold its longest unbreakable chunk (a layer name, an identifier) up to this many characters;
# beyond, the chunk is shown cut with an ellipsis rather than split across lines.
MAX_NAME_WIDTH = 48


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


# A chunk is what the table never splits: a word, or the "name=" part of a "name=value" item (a line may break after
# its "="). Numbers and layer names are single chunks.
_CHUNK = re.compile(r"[^\s=]*=(?=\S)|\S+")
ELLIPSIS = "\N{HORIZONTAL ELLIPSIS}"


def _chunks(para: str) -> list[tuple[str, bool]]:
    """(chunk, whether a space precedes it) for each unbreakable chunk of one line of text."""
    out = []
    for m in _CHUNK.finditer(para):
        out.append((m.group(), m.start() > 0 and para[m.start() - 1].isspace()))
    return out


def longest_chunk(text: str) -> int:
    """The widest piece of `text` that `_wrap` never splits."""
    return max((len(c) for para in text.split("\n") for c, _ in _chunks(para)), default=0)


def ellipsize(text: str, width: int, keep_end: bool = False) -> str:
    """`text` cut to `width` with an ellipsis, at its end (or its start, keeping the end: a layer name's last parts
    are what tell it apart)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    return ELLIPSIS + text[-(width - 1) :] if keep_end else text[: width - 1] + ELLIPSIS


def _wrap(text: str, width: int, keep_end: bool = False) -> list[str]:
    """Wrap each line of `text` to `width` (explicit newlines separate items, e.g. one evidence value per line).

    Lines break at spaces, or after the "=" of a "name=value" item, never inside a word or a number: a chunk wider
    than the column (the caller widens columns to their longest chunk, up to a cap) is cut with an ellipsis.
    """
    width = max(width, 4)
    out: list[str] = []
    for para in text.split("\n"):
        lines: list[str] = []
        line = ""
        for chunk, spaced in _chunks(para):
            joined = line + (" " if spaced and line else "") + chunk
            if not line or len(joined) <= width:
                line = joined
            else:
                lines.append(line)
                line = chunk
        lines.append(line)
        out += [ellipsize(ln, width, keep_end) for ln in lines]
    return out


def _plain_table(findings: Sequence[Finding], width: int, color: bool, types: Mapping[str, str]) -> str:
    header = ("#", "severity", "layer", "what", "evidence", "fix")
    rows = [
        (str(i), f.severity, _layer(f, types), _what(f), format_evidence(f.evidence, sep="\n"), format_fix(f.fixes))
        for i, f in enumerate(findings, 1)
    ]
    gap = 2

    def longest(col: int, cap: int, token_cap: int) -> int:
        """The longest line up to `cap`, but at least the longest unbreakable chunk (up to `token_cap`)."""
        lines = max(len(header[col]), *(len(ln) for r in rows for ln in r[col].split("\n")))
        chunk = max(longest_chunk(r[col]) for r in rows)
        return max(min(lines, cap), min(chunk, token_cap))

    w_num, w_sev = longest(0, 4, 6), longest(1, 8, 8)
    w_layer, w_evid = longest(2, 24, MAX_NAME_WIDTH), longest(4, 32, 32)
    rest = max(width - w_num - w_sev - w_layer - w_evid - 5 * gap, 30)
    w_what = max(rest * 55 // 100, 16, min(max(longest_chunk(r[3]) for r in rows), MAX_NAME_WIDTH))
    w_fix = max(rest - w_what, 12, min(max(longest_chunk(r[5]) for r in rows), MAX_NAME_WIDTH))
    widths = (w_num, w_sev, w_layer, w_what, w_evid, w_fix)

    def line(cells: Sequence[str], styles: Sequence[str | None]) -> list[str]:
        wrapped = [_wrap(c, w, keep_end=col == 2) for col, (c, w) in enumerate(zip(cells, widths))]
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

    layers = [_layer(f, types) for f in findings]
    evidence = [format_evidence(f.evidence, sep="\n") for f in findings]
    # rich wraps at spaces and would crop (or fold) a longer word; so the layer and evidence columns get widths
    # that hold their longest name or "name=value" item (capped), names beyond that cut here with an ellipsis at
    # their start and items broken after their "=". Should even that not fit, the table is drawn wider than the
    # terminal (the terminal wraps it) rather than cropped.
    borders = 6 * 3 + 1  # a border and one space of padding on each side of six columns
    # The least the "what" and "fix" columns can live with: their longest word, within reason.
    w_what = max(16, min(max(longest_chunk(_what(f)) for f in findings), 24))
    w_fix = max(12, min(max(longest_chunk(format_fix(f.fixes)) for f in findings), 24))
    fixed = 1 + 8 + w_what + w_fix + borders
    w_evid = min(max(max(len(ln) for ln in t.split("\n")) for t in evidence), 32)
    w_layer = min(max(longest_chunk(t) for t in layers), MAX_NAME_WIDTH)
    w_layer = max(min(w_layer, width - fixed - w_evid), min(w_layer, 16))
    if fixed + w_layer + w_evid > width:
        w_evid = max(width - fixed - w_layer, min(max(longest_chunk(t) for t in evidence), 32))
    table = Table(show_header=True, header_style="bold", expand=False, show_lines=False)
    for col, kw in (
        ("#", {"justify": "right", "no_wrap": True}),
        ("severity", {"no_wrap": True}),
        ("layer", {"style": "bold", "min_width": w_layer, "max_width": w_layer}),
        ("what", {"min_width": w_what, "overflow": "ellipsis"}),
        ("evidence", {"min_width": w_evid, "max_width": w_evid}),
        ("fix", {"min_width": w_fix, "overflow": "ellipsis"}),
    ):
        table.add_column(col, **kw)
    for i, f in enumerate(findings, 1):
        table.add_row(
            str(i),
            Text(f.severity, style=SEVERITY_COLOR.get(f.severity, "")),
            Text("\n".join(_wrap(layers[i - 1], w_layer, keep_end=True))),
            Text(_what(f), overflow="ellipsis"),
            Text("\n".join(_wrap(evidence[i - 1], w_evid))),
            Text(format_fix(f.fixes), overflow="ellipsis"),
        )
    # Never cropped: when the columns' least widths add up to more than the terminal, the table is drawn wider
    # (the terminal wraps it). rich crops a table that does not fit, and the least widths it settles on are not
    # exactly the ones asked for, so a cropped drawing (a row whose last character is not a border) is redrawn
    # a little wider.
    least = len(str(len(findings))) + 8 + w_layer + w_what + w_evid + w_fix + borders
    drawn = ""
    for extra in range(0, 64, 4):
        buf = io.StringIO()
        Console(
            file=buf, width=max(width, least + extra), force_terminal=True, color_system="standard", no_color=False
        ).print(table)
        drawn = buf.getvalue().rstrip("\n")
        if all(_ANSI_CODE.sub("", ln).rstrip()[-1:] in _BORDERS for ln in drawn.splitlines()):
            break
    return drawn


_ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")
_BORDERS = set("\u2513\u2503\u2529\u2502\u2518\u2510\u2524\u252b\u251b\u2537\u2534\u2502\u2503")


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
    report: Report,
    *,
    width: int = DEFAULT_WIDTH,
    color: bool = False,
    quiet: bool = False,
    source: str = "",
    layers: bool = False,
    unicode: bool = True,
) -> str:
    """The whole terminal summary: a header, the depth profile (with `layers`), the findings table, fix snippets,
    and the verdict last (so it is the line a reader sees at the bottom of a CI log). `source` says where the model
    came from, e.g. "model.py: build_model()". `quiet` keeps only the verdict. `unicode` draws the profile's bars
    with block characters (else with '#', for terminals that cannot show them)."""
    if quiet:
        return verdict(report, color)
    params = f"{report.model.parameters:,} parameters"
    origin = f" from {source}" if source else ""
    head = _paint(f"actdiag: {report.model.name}", "bold", color) + f"{origin} ({params}, on {report.run.device})"
    parts = [head]
    if layers:
        parts.append(layers_table(report.layers, width=width, color=color, unicode=unicode))
    if report.findings:
        types = {layer.name: layer.type for layer in report.layers}
        parts.append(findings_table(report.findings, width=width, color=color, types=types))
        snippets = fix_snippets(report.findings, color=color)
        if snippets:
            parts.append(snippets)
    parts.append(verdict(report, color))
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------- simple grids
def _grid(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    width: int,
    color: bool,
    right: Sequence[int] = (),
    squeeze: int = 1,
    row_styles: Sequence[str | None] = (),
) -> str:
    """A one-line-per-row table. Columns are as wide as their widest cell; when that is wider than `width`, column
    `squeeze` (the layer names) gives way, its names cut at the start with an ellipsis (never split)."""
    gap = 2
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    over = sum(widths) + gap * (len(widths) - 1) - width
    if over > 0:
        widths[squeeze] = max(widths[squeeze] - over, len(header[squeeze]), 12)

    def line(cells: Sequence[str], style: str | None) -> str:
        parts = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            text = ellipsize(cell, w, keep_end=True)
            parts.append(text.rjust(w) if i in right else text.ljust(w))
        out = (" " * gap).join(parts).rstrip()
        return _paint(out, style, color) if style else out

    lines = [line(header, "bold"), (" " * gap).join("-" * w for w in widths)]
    for k, row in enumerate(rows):
        lines.append(line(row, row_styles[k] if k < len(row_styles) else None))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- depth profile
BAR_WIDTH = 12
BAR_DECADES = 6
_EIGHTHS = " \u258f\u258e\u258d\u258c\u258b\u258a\u2589\u2588"


def log_bar(
    value: float | None, top: float, *, width: int = BAR_WIDTH, decades: int = BAR_DECADES, unicode: bool = True
) -> str:
    """A bar on a log scale: full at `top`, one character less per `decades / width` decades below it, empty at
    zero; a positive value below the range keeps the thinnest mark, so that tiny is never drawn as zero."""
    if value is None or not math.isfinite(value) or value <= 0 or not math.isfinite(top) or top <= 0:
        return ""
    frac = min(max(1.0 + math.log10(value / top) / decades, 0.0), 1.0)
    if unicode:
        eighths = max(round(frac * width * 8), 1)
        full, part = divmod(eighths, 8)
        return "\u2588" * full + (_EIGHTHS[part] if part else "")
    return "#" * max(round(frac * width), 1)


def _share(v: float | None) -> str:
    if v is None:
        return ""
    if math.isnan(v):
        return "nan"
    return f"{v:.0%}" if v == 0 or v >= 0.01 else "<1%"


def layers_table(
    layers: Sequence[LayerStats], *, width: int = DEFAULT_WIDTH, color: bool = False, unicode: bool = True
) -> str:
    """The per-layer depth profile of the latest recorded step, in forward order: activation std and gradient RMS
    with log-scale bars (full bar = the largest value over the layers, each `BAR_WIDTH / BAR_DECADES` characters a
    decade below it), dead and saturated shares, and non-finite counts."""
    if not layers:
        return "depth profile: no layer was recorded"
    stds = [layer.activation.std if layer.activation is not None else None for layer in layers]
    rmss = [layer.gradient.rms if layer.gradient is not None else None for layer in layers]

    def top(values: Sequence[float | None]) -> float:
        return max((v for v in values if v is not None and math.isfinite(v) and v > 0), default=math.nan)

    t_std, t_rms = top(stds), top(rmss)
    rows = []
    styles: list[str | None] = []
    for i, (layer, std, rms) in enumerate(zip(layers, stds, rmss)):
        nonfinite = sum(s.nonfinite_count for s in (layer.activation, layer.gradient) if s is not None)
        rows.append(
            (
                str(i),
                layer.label,
                layer.type,
                format_number(std) if std is not None else "",
                log_bar(std, t_std, unicode=unicode).ljust(BAR_WIDTH),
                format_number(rms) if rms is not None else "",
                log_bar(rms, t_rms, unicode=unicode).ljust(BAR_WIDTH),
                _share(layer.dead_fraction),
                _share(layer.saturation),
                f"{nonfinite:,}" if nonfinite else "",
            )
        )
        styles.append("red" if nonfinite else None)
    header = ("#", "layer", "type", "act std", "", "grad rms", "", "dead", "sat", "non-finite")
    table = _grid(header, rows, width=width, color=color, right=(0, 3, 5, 7, 8, 9), row_styles=styles)
    title = _paint("depth profile", "bold", color)
    note = f"(bars: log scale, full = the largest value, {BAR_WIDTH // BAR_DECADES} characters a decade)"
    return f"{title} {note}\n{table}"


# ----------------------------------------------------------------------------------------------- diff
def _arrow(before: float | None, after: float | None, share: bool) -> str:
    fmt = _share if share else (lambda v: format_number(v) if v is not None else "")
    if before is None and after is None:
        return ""
    return f"{fmt(before) or '-'} -> {fmt(after) or '-'}"


def _finding_line(f: Finding) -> str:
    at = f" at {f.layer}" if f.layer is not None else ""
    return f"{f.severity:<8} {f.code}{at}: {f.message}"


def format_diff(
    diff: RunDiff, *, names: tuple[str, str] = ("before", "after"), width: int = DEFAULT_WIDTH, color: bool = False
) -> str:
    """The terminal view of `actdiag diff`: per-layer changes (metrics either run measured; a '*' marks a notable
    change), layers only one run has, findings that appeared (with their fixes), went away, or remained, and a
    verdict line last."""
    from actdiag.reports.diff import METRICS

    b_name, a_name = names
    head = _paint(f"actdiag diff: {diff.after.model.name}", "bold", color) + f", {b_name} -> {a_name}"
    parts = [head]
    metrics = [
        m
        for m in METRICS
        if any((c := layer.change(m.name)).before is not None or c.after is not None for layer in diff.layers)
        and (m.name != "nonfinite" or any(layer.change(m.name).notable for layer in diff.layers))
        and m.name != "grad_norm"  # the table shows the RMS; the norm is in the data (RunDiff) for scripts
    ]
    if diff.layers:
        rows = []
        styles: list[str | None] = []
        for layer in diff.layers:
            cells = []
            for m in metrics:
                c = layer.change(m.name)
                text = _arrow(c.before, c.after, m.share)
                ratio = c.ratio
                # A ratio says something only between two non-zero values ("0.13 -> 0" says it all).
                if not m.share and m.name != "nonfinite" and ratio and math.isfinite(ratio) and c.notable:
                    text += f" (x{format_number(ratio)})"
                cells.append(text)
            rows.append(("*" if layer.notable else "", layer.label, layer.type, *cells))
            styles.append("yellow" if layer.notable else None)
        header = ("", "layer", "type", *(m.label for m in metrics))
        parts.append(_grid(header, rows, width=width, color=color, row_styles=styles))
    if diff.only_before:
        parts.append(f"layers only in {b_name}: {', '.join(diff.only_before)}")
    if diff.only_after:
        parts.append(f"layers only in {a_name}: {', '.join(diff.only_after)}")
    types = {layer.name: layer.type for layer in diff.after.layers}
    if diff.appeared:
        title = _paint(f"appeared in {a_name} ({len(diff.appeared)}):", "bold", color)
        parts.append(title + "\n" + findings_table(diff.appeared, width=width, color=False, types=types))
    for label, found in (("went away", diff.went_away), ("remained", diff.remained)):
        if found:
            lines = [ellipsize(_finding_line(f), width) for f in found]
            parts.append(_paint(f"{label} ({len(found)}):", "bold", color) + "\n" + "\n".join(lines))
    parts.append(diff_verdict(diff, names=names, color=color))
    return "\n\n".join(parts)


def diff_verdict(diff: RunDiff, *, names: tuple[str, str] = ("before", "after"), color: bool = False) -> str:
    """One line: how many findings appeared and went away, and how many layers changed notably."""
    notable = sum(1 for layer in diff.layers if layer.notable)
    changed = f"{notable} of {len(diff.layers)} layer{'s' if len(diff.layers) != 1 else ''} changed notably"
    if not diff.appeared and not diff.went_away:
        return _paint("diff: no finding appeared or went away", "green", color) + f"; {changed}"
    parts = []
    if diff.appeared:
        parts.append(f"{len(diff.appeared)} appeared ({_counts(diff.appeared)})")
    if diff.went_away:
        parts.append(f"{len(diff.went_away)} went away")
    worst = max(diff.appeared, key=lambda f: f.rank).severity if diff.appeared else None
    style = SEVERITY_COLOR.get(worst, "bold") if worst else "green"
    return _paint(f"diff: findings {', '.join(parts)}", style, color) + f"; {changed}"


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
