"""The HTML report as a document: findings first and ranked, escaped user data, no URL, bounded size with many
layers, the over-time section for watch runs, atomic writes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from html import escape as html_escape
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

import actdiag
from actdiag.errors import ReportPathError
from actdiag.records import Report
from actdiag.reports.figures import MAX_RIDGE_LAYERS, RIDGE_ROWS_PER_PAGE
from actdiag.reports.html import fmt, render_html, save_html

from .conftest import XSS_NAME, DeepNet, hand_findings, pathology_run


class _Fetches(HTMLParser):
    """Everything in a document that makes a browser fetch something: URL-valued attributes and embedding tags."""

    URL_ATTRS = {"src", "href", "xlink:href", "srcset", "action", "formaction", "poster", "data", "background"}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("link", "iframe", "object", "embed", "base", "audio", "video", "source"):
            self.found.append(f"<{tag}>")
        for name, value in attrs:
            value = (value or "").strip()
            if name in self.URL_ATTRS and not value.startswith(("#", "data:")):
                self.found.append(f"{tag} {name}={value}")


def _no_urls(html: str) -> None:
    """Nothing that a browser would fetch: URL attributes only in-page anchors or inline data, no url(...) in styles
    but #ids, no @import."""
    parser = _Fetches()
    parser.feed(html)
    assert parser.found == []
    assert [u for u in re.findall(r"url\(\s*['\"]?([^)'\"]*)", html) if not u.startswith("#")] == []
    assert "@import" not in html
    # The only http text left is SVG's XML namespace names, which are identifiers, never fetched.
    assert set(re.findall(r"https?://[^\s\"'<>]+", html)) <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }


def test_reports_html_url_check_can_fail() -> None:
    with pytest.raises(AssertionError):
        _no_urls('<p>x</p><img src="https://cdn.example/x.png">')
    with pytest.raises(AssertionError):
        _no_urls("<style>body { background: url(http://x/y.png) }</style>")
    _no_urls('<p>&lt;img src=x onerror=alert(1)&gt;</p><a href="#top">top</a>')


@pytest.fixture(scope="module")
def rendered() -> tuple[Report, str, dict[str, object]]:
    """One small inspect report with hand-built findings, rendered once for several tests; matplotlib's global state
    is captured around the render."""
    import matplotlib

    report = replace(actdiag.inspect(DeepNet(depth=4), torch.randn(32, 16)), findings=hand_findings())
    before = {"backend": matplotlib.get_backend(), "rc": dict(matplotlib.rcParams)}
    html = render_html(report)
    after = {"backend": matplotlib.get_backend(), "rc": dict(matplotlib.rcParams)}
    return report, html, {"before": before, "after": after}


def test_reports_html_findings_first_ranked_and_escaped(rendered: tuple[Report, str, dict[str, object]]) -> None:
    _, html, _ = rendered
    _no_urls(html)
    # Findings come before the first figure, most severe first.
    pos = [html.index(f'class="finding {sev}"') for sev in ("error", "warning", "info")]
    assert pos == sorted(pos) and pos[-1] < html.index('id="histograms"')
    # User data is escaped wherever it appears: layer names (table, finding, figures) and snippets.
    assert XSS_NAME not in html
    assert "<script>alert(2)</script>" not in html and "<b>bold?</b>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<script>") == 1  # only the page's own copy-button script
    # The fix snippet is there to copy, verbatim once unescaped.
    assert "model.blocks[&#39;act0&#39;] = nn.LeakyReLU(0.01)  # &lt;/code&gt;&lt;script&gt;" in html
    assert "verified: the finding went away" in html and "tried: the finding stayed" in html
    assert "not verified (run with --try-fixes)" in html
    # Evidence and the re-run's before/after numbers.
    assert ">0.625<" in html and ">1.500e-06<" in html and ">1.100e-06<" in html
    assert "whole model" in html and "blocks.act2" in html  # layer None, related layers


def test_reports_html_layers_and_figures(rendered: tuple[Report, str, dict[str, object]]) -> None:
    report, html, state = rendered
    labels = [ly.label for ly in report.layers]
    assert len(labels) == 9 and labels[-1] == XSS_NAME  # the markup-named head really ran
    body = html[html.index('id="layers"') :]
    # Every layer is a row of the table, in forward order.
    shown = [html_escape(lb, quote=True).replace("&#x27;", "&#39;") for lb in labels]
    idx = [body.index(f'<td class="mono">{lb}</td>') for lb in shown]
    assert idx == sorted(idx)
    for section in ("histograms", "flow", "units", "magnitudes"):
        part = html[html.index(f'<section id="{section}"') :]
        part = part[: part.index("</section>")]
        assert "<svg" in part, section
    assert 'id="time"' not in html  # one step: no over-time section
    # Figures are drawn on their own Figure objects: the user's backend, rcParams and pyplot figures are untouched.
    assert state["before"] == state["after"]
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_reports_html_watch_has_time_section(watch_report: Report) -> None:
    assert watch_report.history is not None and len(watch_report.history.hist_steps) > 2
    html = render_html(watch_report)
    part = html[html.index('<section id="time"') :]
    part = part[: part.index("</section>")]
    assert part.count("<svg") == 3  # distribution heatmaps, update ratios and gradient norms, weight norms
    assert '<figure id="weights">' in part
    assert f"({len(watch_report.history.steps)} recorded steps)" in part
    _no_urls(html)


def test_reports_html_many_layers_stays_small(tmp_path: Path) -> None:
    """200 layers: a bounded number of histogram rows in at most two pages, every layer in the table, and a file
    measured in hundreds of kilobytes."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(100)])
    report = actdiag.inspect(model, torch.randn(8, 8))
    assert len(report.layers) == 200
    path = save_html(report, tmp_path / "big.html")
    html = path.read_text()
    size = os.path.getsize(path)
    assert size < 500_000, size
    grid = html[html.index('<section id="histograms"') : html.index('<section id="flow"')]
    assert grid.count("<svg") == MAX_RIDGE_LAYERS // RIDGE_ROWS_PER_PAGE
    assert "Showing 72 of 200 layers" in grid
    # Each shown layer is one row, with an element id of its own: exactly the shown rows, no more.
    assert len(re.findall(r'id="row\d+"', grid)) == MAX_RIDGE_LAYERS
    assert html.count("<tr>") + html.count('<tr class="flagged">') >= 200
    _no_urls(html)


def test_reports_html_says_when_statistics_are_estimated() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    x = torch.randn(32, 64)

    def html_of(every: int) -> str:
        with actdiag.watch(model, every=every, sample_cap=500) as mon:
            model(x).sum().backward()
            model.zero_grad()
            mon.step()
        return render_html(mon.report(), figures=False)

    # Of the 14 tensors (3 outputs, 3 output gradients, 4 parameters and their gradients), the first two layers'
    # 32x64 outputs and their gradients and the 64x64 weight and its gradient exceed the cap of 500.
    assert "6 of 14 tensors at the latest step are estimated" in html_of(1)
    assert "are estimated" not in html_of(50)


def test_reports_html_figure_free_render_and_fmt(small_report: Report) -> None:
    html = render_html(small_report, figures=False)
    assert "<svg" not in html and "Layer table" in html and "No findings" in html
    assert fmt(None) == "\u2013" and fmt(1234) == "1,234" and fmt(0.5) == "0.5" and fmt(2e-7) == "2.000e-07"
    assert fmt(float("nan")) == "nan" and fmt(float("-inf")) == "-inf" and fmt(True) == "yes"


def test_reports_html_atomic_write(small_report: Report, tmp_path: Path) -> None:
    small_report = replace(small_report, layers=small_report.layers[:1])  # the figures are not the point here
    out = small_report.save_html(tmp_path / "new" / "dir" / "r.html")
    assert out.read_text().startswith("<!DOCTYPE html>")
    blocker = tmp_path / "taken"
    blocker.mkdir()
    with pytest.raises(ReportPathError):
        save_html(small_report, blocker)  # a directory is in the way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "taken"]  # no temporary file left behind
    assert list(blocker.iterdir()) == []


def test_reports_html_import_stays_light() -> None:
    """`import actdiag` must not pull in matplotlib, seaborn or jinja2 (they load when a report is written)."""
    code = "import sys, actdiag; print(sorted(m for m in ('matplotlib', 'seaborn', 'jinja2') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "[]"


class NanNet(nn.Module):
    """Finite input, then a layer whose output is entirely NaN: every later statistic has no finite value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc(x) * float("nan")))


def test_reports_html_nonfinite_and_empty_reports(tmp_path: Path) -> None:
    report = actdiag.inspect(NanNet(), torch.randn(8, 4))
    assert report.layers[-1].activation is not None and report.layers[-1].activation.count == 0
    html = render_html(report)
    assert "<svg" in html  # the first layer still has a histogram
    assert html.count(">nan<") >= 2  # NaN statistics are shown as such in the table
    empty = replace(report, layers=(), params=(), history=None)
    html = render_html(empty)
    assert "0 layers" in html and "Not recorded." in html


def test_reports_html_pathology_figures_in_the_page() -> None:
    """The marks the figures carry reach the page: the zero-gradient marks, one bar per share, one row per layer,
    and every element id in the document is unique (several inline SVGs share one id space)."""
    _, report = pathology_run()
    html = render_html(report)
    _no_urls(html)
    ids = re.findall(r'\sid="([^"]+)"', html)
    assert len(ids) == len(set(ids))
    flow = html[html.index('<section id="flow"') : html.index('<section id="units"')]
    assert 'id="zero-grad-0"' in flow and 'id="zero-act-0"' in flow
    units = html[html.index('<section id="units"') : html.index('<section id="magnitudes"')]
    assert {"dead_fraction-1", "dead_fraction-2", "saturation-0"} <= set(re.findall(r'id="([^"]+)"', units))
    for name in ("act0", "act1", "act2"):
        assert f">{name}</text>" in units
    depth = html[html.index('<section id="histograms"') : html.index('<section id="flow"')]
    assert len(re.findall(r'id="row\d+"', depth)) == len(report.layers)
