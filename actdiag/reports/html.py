"""The HTML report (shared/CONTRACT.md section 4): one self-contained file, findings first, then the figures.

The page works offline and from any folder: styles and the few lines of script are inline, figures are inline SVG,
and no URL of any kind is referenced. Jinja2 autoescapes everything (layer names, messages and snippets are user
data); the only markup inserted unescaped is the SVG that `figures` produced, whose text matplotlib escapes.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actdiag.formatting import format_number
from actdiag.records import SEVERITY_RANK, Finding, LayerStats, Report, measured_stats
from actdiag.reports._atomic import atomic_write

# Mirrors figures.MAX_RIDGE_LAYERS without importing the figures module (and matplotlib) for figure-less renders.
MAX_RIDGE_LAYERS = 72

TEMPLATE = "report.html.j2"
# The layer table is collapsed above this many rows so the findings and figures stay at the top of the page.
OPEN_TABLE_ROWS = 60
# Related layers listed per finding before "and N more".
MAX_RELATED = 12


def fmt(value: Any) -> str:
    """Numbers as a person reads them, to 4 significant digits (`format_number`); missing as a dash, flags as yes/no."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format_number(value, digits=4)


def pct(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "\u2013"
    return f"{value:.1%}"


@dataclass(frozen=True, slots=True)
class LayerRow:
    index: int
    layer: LayerStats
    flagged: bool


def flagged_layers(findings: Sequence[Finding]) -> list[str]:
    """Layers named by a finding (its own and related ones), most severe finding first."""
    out: dict[str, None] = {}
    for f in findings:
        if f.layer is not None:
            out[f.layer] = None
        out.update(dict.fromkeys(f.related))
    return list(out)


def _ranked(findings: Sequence[Finding]) -> list[Finding]:
    # The rules rank already; a stable sort on severity keeps their order within a severity.
    return sorted(findings, key=lambda f: -SEVERITY_RANK.get(f.severity, 0))


def _environment() -> Any:
    try:
        import jinja2
    except ImportError as exc:
        raise ImportError("actdiag's HTML report needs Jinja2: pip install jinja2") from exc
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    env.filters["pct"] = pct
    return env


def render_html(report: Report, *, figures: bool = True) -> str:
    """The report as one HTML document (a string). `figures=False` leaves the plots out (fast, for tests)."""
    findings = _ranked(report.findings)
    flagged = flagged_layers(findings)
    figs: Mapping[str, Any] = {}
    if figures:
        from actdiag.reports.figures import all_figures

        figs = all_figures(report.layers, report.history, flagged)

    def safe_svg(r: Any) -> Any:
        return None if r is None else _markup(r.svg)

    counts = {sev: sum(1 for f in findings if f.severity == sev) for sev in ("error", "warning", "info")}
    measured = measured_stats(report.layers, report.params)
    flagged_set = set(flagged)
    rows = [
        LayerRow(i + 1, ly, ly.label in flagged_set or ly.name in flagged_set) for i, ly in enumerate(report.layers)
    ]
    history = report.history
    n_depth = sum(1 for ly in report.layers if ly.activation is not None and ly.activation.count)
    context = {
        "report": report,
        "findings": findings,
        "counts": counts,
        "related_cap": MAX_RELATED,
        "rows": rows,
        "open_table": len(rows) <= OPEN_TABLE_ROWS,
        "is_watch": history is not None and len(history.steps) > 1,
        "history_steps": len(history.steps) if history is not None else 0,
        "depth": [(p.title, p.note, _markup(p.svg)) for p in figs.get("depth", [])],
        "n_depth_layers": n_depth,
        "depth_shown": min(n_depth, MAX_RIDGE_LAYERS),
        "flow": safe_svg(figs.get("flow")),
        "units": safe_svg(figs.get("units")),
        "magnitudes": safe_svg(figs.get("magnitudes")),
        "time": safe_svg(figs.get("time")),
        "time_note": figs["time"].note if figs.get("time") is not None else "",
        "series": safe_svg(figs.get("series")),
        "weights": safe_svg(figs.get("weights")),
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "figures": figures,
        "measured": len(measured),
        "estimated": sum(1 for st in measured if st.estimated),
    }
    return _environment().get_template(TEMPLATE).render(**context)


def _markup(svg: str) -> Any:
    """Mark figure SVG as safe for the template: it is generated here, and matplotlib escapes the text in it."""
    from markupsafe import Markup

    return Markup(svg)


def save_html(report: Report, path: str | os.PathLike[str]) -> Path:
    """Write the report to `path` atomically (a crash never leaves half a file) and return the path."""
    return atomic_write(path, render_html(report))
