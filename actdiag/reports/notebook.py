"""Notebook views: the short `repr()` of a `Report`, `Monitor` and `Finding`, and their `_repr_html_`.

A notebook shows an object's `_repr_html_` in place of its repr when the object is the last value of a cell. The view
is compact (findings, then the depth profile as a table with inline bars; the figures stay in `save_html`), bounded in
size whatever the model (rows are capped, flagged layers first), and self-contained: inline styles only, no script,
no URL, no `<style>` element that would restyle the rest of the notebook. Names, messages and snippets come from user
code and are escaped everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING

from actdiag.reports.html import flagged_layers, fmt, pct

if TYPE_CHECKING:
    from actdiag.monitor import Monitor
    from actdiag.records import Finding, LayerStats, Report

MAX_PROFILE_ROWS = 120  # depth-profile rows in a notebook; save_html shows every layer
MAX_FINDINGS = 30
MAX_REPR_FINDINGS = 3
BAR_PX = 80

_SEV_COLOR = {"error": "#c0392b", "warning": "#d68910", "info": "#2e86c1"}
_MONO = "font-family:ui-monospace,Menlo,Consolas,monospace"
_CELL = "padding:1px 6px;text-align:left;vertical-align:top;border-bottom:1px solid #eee"
_NUM = "padding:1px 6px;text-align:right;font-variant-numeric:tabular-nums;border-bottom:1px solid #eee"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


# ------------------------------------------------------------------------------------------------ repr
def finding_repr(f: Finding) -> str:
    """One line: severity, code, layer, the start of the message and the fix codes."""
    fixes = ", ".join(x.code for x in f.fixes)
    layer = "whole model" if f.layer is None else repr(_clip(f.layer, 60))
    return f"Finding({f.severity} {f.code} at {layer}: {_clip(f.message, 100)!r}" + (
        f"; fixes: {fixes})" if fixes else ")"
    )


def _findings_summary(findings: Sequence[Finding]) -> str:
    if not findings:
        return "no findings"
    shown = ", ".join(
        f"{f.severity} {f.code}" + (f" at {_clip(f.layer, 40)!r}" if f.layer is not None else "")
        for f in findings[:MAX_REPR_FINDINGS]
    )
    more = len(findings) - MAX_REPR_FINDINGS
    return f"{len(findings)} finding{'s' if len(findings) != 1 else ''}: {shown}" + (
        f" and {more} more" if more > 0 else ""
    )


def report_repr(r: Report) -> str:
    """A few lines' worth at most: the model, the run and the first findings (the records stay one attribute away)."""
    return (
        f"<actdiag.Report {_clip(r.model.name, 60)!r}: {len(r.layers)} layers, {r.run.recorded_steps} of "
        f"{r.run.steps} steps recorded, {_findings_summary(r.findings)}>"
    )


# ------------------------------------------------------------------------------------------------ html
def _badge(severity: str) -> str:
    color = _SEV_COLOR.get(severity, "#666")
    return (
        f'<span style="display:inline-block;padding:0 7px;border-radius:9px;font-size:11px;font-weight:600;'
        f'color:#fff;background:{color}">{escape(severity)}</span>'
    )


def _finding_block(f: Finding, snippets: bool) -> str:
    layer = "whole model" if f.layer is None else f.layer
    evidence = " &middot; ".join(f"{escape(str(k))} = <b>{escape(fmt(v))}</b>" for k, v in f.evidence.items())
    fixes = ", ".join(f'<span style="{_MONO}">{escape(x.code)}</span>' for x in f.fixes)
    parts = [
        f'<div style="border-left:4px solid {_SEV_COLOR.get(f.severity, "#666")};padding:3px 8px;margin:4px 0">',
        f'{_badge(f.severity)} <b style="{_MONO}">{escape(f.code)}</b> '
        f'<span style="{_MONO};background:#f1f1f1;padding:0 4px">{escape(layer)}</span>',
        f'<div style="margin:2px 0">{escape(f.message)}</div>',
    ]
    if evidence:
        parts.append(f'<div style="font-size:11.5px;color:#444">{evidence}</div>')
    if f.related:
        shown = ", ".join(escape(_clip(x, 60)) for x in f.related[:8])
        more = f" and {len(f.related) - 8} more" if len(f.related) > 8 else ""
        parts.append(f'<div style="font-size:11.5px;color:#666">also in: {shown}{more}</div>')
    if snippets:
        for x in f.fixes:
            verified = {True: " (verified)", False: " (tried: did not help)"}.get(x.verified, "")  # type: ignore[arg-type]
            parts.append(f'<div style="margin-top:3px"><b>Fix {escape(x.code)}</b>{verified}: {escape(x.text)}</div>')
            if x.snippet:
                parts.append(
                    f'<pre style="margin:2px 0;padding:4px 6px;background:#f6f6f6;{_MONO};font-size:11.5px">'
                    f"{escape(x.snippet)}</pre>"
                )
    elif fixes:
        parts.append(f'<div style="font-size:11.5px">fixes: {fixes}</div>')
    parts.append("</div>")
    return "".join(parts)


def finding_html(f: Finding) -> str:
    """One finding with its evidence and its fixes as code to copy."""
    return f'<div style="font:13px/1.4 system-ui,sans-serif">{_finding_block(f, snippets=True)}</div>'


def _log_bar(value: float | None, lo: float, hi: float, color: str) -> str:
    """A bar whose length is the value on a log scale over [lo, hi]; exactly 0 is written out, as no bar can show it."""
    if value is None or not math.isfinite(value):
        return "\u2013"
    if value <= 0:
        return '<span style="color:#c0392b;font-weight:600">0</span>'
    frac = 1.0 if hi <= lo else (math.log10(value) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    width = max(1, round(BAR_PX * min(1.0, max(0.0, frac))))
    return (
        f'<span style="display:inline-block;width:{width}px;height:8px;background:{color};margin-right:4px"></span>'
        f"{escape(fmt(value))}"
    )


def _share_bar(value: float | None, color: str) -> str:
    if value is None or not math.isfinite(value):
        return ""
    width = round(BAR_PX * min(1.0, max(0.0, value)))
    bar = f'<span style="display:inline-block;width:{width}px;height:8px;background:{color};margin-right:4px"></span>'
    return (bar if width else "") + escape(pct(value))


def _range(values: Sequence[float | None]) -> tuple[float, float]:
    pos = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return (min(pos), max(pos)) if pos else (1.0, 1.0)


def profile_rows(layers: Sequence[LayerStats], flagged: Sequence[str]) -> list[int]:
    """Indices of the layers the notebook table shows: all of them up to the cap, else flagged first and the rest
    evenly spaced by depth (the same selection as the report's figures)."""
    labels = [ly.label for ly in layers]
    n = len(labels)
    if n <= MAX_PROFILE_ROWS:
        return list(range(n))
    flagged_set = set(flagged)
    keep = [i for i, lb in enumerate(labels) if lb in flagged_set][:MAX_PROFILE_ROWS]
    rest = [i for i in range(n) if i not in set(keep)]
    room = MAX_PROFILE_ROWS - len(keep)
    if room > 0 and rest:
        step = len(rest) / room
        keep.extend(rest[min(len(rest) - 1, int(k * step))] for k in range(room))
    return sorted(set(keep))


def report_html(r: Report) -> str:
    """The notebook view of a report: a header, the findings, and the depth profile."""
    findings = sorted(r.findings, key=lambda f: -f.rank)
    flagged = flagged_layers(findings)
    flagged_set = set(flagged)
    counts = {sev: sum(1 for f in findings if f.severity == sev) for sev in ("error", "warning", "info")}
    badges = (
        " ".join(f"{_badge(sev)} &times;{n}" if n > 1 else _badge(sev) for sev, n in counts.items() if n)
        or '<span style="color:#1e8449;font-weight:600">no findings</span>'
    )
    out = [
        '<div style="font:13px/1.4 system-ui,sans-serif;max-width:1000px">',
        f"<div><b>actdiag</b> &middot; <b>{escape(r.model.name)}</b> &middot; {len(r.layers)} layers &middot; "
        f"{r.run.recorded_steps} of {r.run.steps} steps recorded &middot; {badges}</div>",
    ]
    for f in findings[:MAX_FINDINGS]:
        out.append(_finding_block(f, snippets=False))
    if len(findings) > MAX_FINDINGS:
        out.append(f"<div>and {len(findings) - MAX_FINDINGS} more findings (see save_html)</div>")
    layers = r.layers
    if layers:
        rows = profile_rows(layers, flagged)
        astd = [ly.activation.std if ly.activation and ly.activation.count else None for ly in layers]
        grms = [ly.gradient.rms if ly.gradient and ly.gradient.count else None for ly in layers]
        alo, ahi = _range(astd)
        glo, ghi = _range(grms)
        head = "".join(
            f'<th style="{_CELL};position:sticky;top:0;background:#f4f4f4">{h}</th>'
            for h in ("#", "layer", "type", "activation std (log)", "gradient RMS (log)", "dead / saturated")
        )
        body = []
        for i in rows:
            ly = layers[i]
            unit = _share_bar(ly.dead_fraction, "#4c72b0") if ly.dead_fraction is not None else ""
            if ly.saturation is not None:
                unit += (" " if unit else "") + _share_bar(ly.saturation, "#dd8452")
            bg = ' style="background:#fdecea"' if ly.label in flagged_set else ""
            cells = (
                f'<td style="{_NUM}">{i + 1}</td>',
                f'<td style="{_CELL};{_MONO}">{escape(_clip(ly.label, 48))}</td>',
                f'<td style="{_CELL}">{escape(ly.type)}</td>',
                f'<td style="{_CELL}">{_log_bar(astd[i], alo, ahi, "#4c72b0")}</td>',
                f'<td style="{_CELL}">{_log_bar(grms[i], glo, ghi, "#dd8452")}</td>',
                f'<td style="{_CELL}">{unit}</td>',
            )
            body.append(f"<tr{bg}>{''.join(cells)}</tr>")
        shown = "" if len(rows) == len(layers) else f" ({len(rows)} of {len(layers)}: flagged first, the rest by depth)"
        out.append(
            f'<details open><summary style="cursor:pointer;font-weight:600">depth profile{shown}</summary>'
            '<div style="max-height:420px;overflow:auto">'
            f'<table style="border-collapse:collapse;font-size:12px"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div></details>"
        )
    out.append('<div style="color:#666;font-size:11.5px">The figures: <code>save_html(path)</code>.</div></div>')
    return "".join(out)


def monitor_repr(m: Monitor) -> str:
    """The monitor's state without running the rules (a repr must be cheap and have no side effect)."""
    state = "closed" if m._closed else ("watching" if m._active else "not started")
    return (
        f"<actdiag.Monitor {_clip(m.name, 60)!r}: {state}, every {m.every} steps, {m.steps} steps, "
        f"{m.recorded_steps} recorded>"
    )


def monitor_html(m: Monitor) -> str:
    """The report of what was recorded so far, or a line saying nothing was."""
    if m.latest is None:
        return f'<div style="font:13px/1.4 system-ui,sans-serif">{escape(monitor_repr(m))}: no step recorded yet.</div>'
    return report_html(m.report())
