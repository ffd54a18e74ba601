"""The HTML report in a real browser: headless Chromium loads it offline with no console error, no network request
and no script from the data, and draws a page that is not blank."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actdiag.records import Report

pytestmark = pytest.mark.browser


def _assert_clean(result, path: Path) -> None:  # type: ignore[no-untyped-def]
    own = path.resolve().as_uri()
    assert result.console_errors == []
    assert result.exceptions == []
    assert result.dialogs == []  # the markup in layer names and snippets never ran
    # The only request is the document itself (inline figures make none; data: URLs are not network either).
    assert [u for u in result.requests if u != own and not u.startswith("data:")] == []


def _not_blank(png: bytes) -> float:
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return float(img.std())


def test_reports_browser_watch_report_loads_clean(
    watch_report: Report, tmp_path: Path, chromium_page: Callable[..., object]
) -> None:
    path = watch_report.save_html(tmp_path / "report.html")
    script = (
        "JSON.stringify({svgs: document.querySelectorAll('svg.fig').length,"
        " findings: document.querySelectorAll('article.finding').length,"
        " firstCode: document.querySelector('article.finding .code').textContent,"
        " xssImgs: document.querySelectorAll('img').length,"
        " copy: (document.querySelector('button.copy').click(), 'clicked')})"
    )
    result = chromium_page(path, script=script)
    _assert_clean(result, path)

    values = json.loads(result.values["script"])
    assert values["findings"] == 3
    assert values["firstCode"] == "vanishing_gradient"  # the error is ranked first
    assert values["xssImgs"] == 0
    assert values["svgs"] >= 5  # grid, flow, units, magnitudes, over-time heatmaps, series
    assert _not_blank(result.screenshot) > 10.0


def test_reports_browser_checks_can_fail(tmp_path: Path, chromium_page: Callable[..., object]) -> None:
    """The driver sees what the report must not do: a console error, a network request; and an empty page is
    measured as blank."""
    path = tmp_path / "bad.html"
    path.write_text(
        "<!DOCTYPE html><html><body><script>console.error('boom')</script>"
        '<img style="display:none" src="http://127.0.0.1:9/x.png"></body></html>'
    )
    result = chromium_page(path)
    assert any("boom" in e for e in result.console_errors)
    assert "http://127.0.0.1:9/x.png" in result.requests
    assert _not_blank(result.screenshot) < 1.0


# What a person looks at, measured in the page as Chromium laid it out: the zero marks are drawn (a box of their own,
# inside their figure), the dead-and-saturated chart's names and bars do not overlap, each histogram row is drawn.
_LAYOUT = """
(() => {
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const units = document.querySelector('#units svg');
  const names = ['act0', 'act1', 'act2'].map(
    (n) => [...units.querySelectorAll('text')].find((t) => t.textContent === n));
  const flow = document.querySelector('#flow svg');
  return JSON.stringify({
    zeroGrad: [...document.querySelectorAll('#zero-grad-0 use')].map(box),
    zeroAct: [...document.querySelectorAll('#zero-act-0 use')].map(box),
    flow: box(flow),
    names: names.map((t) => (t ? box(t) : null)),
    bars: [...units.querySelectorAll('[id^="dead_fraction-"], [id^="saturation-"]')].map(box),
    rows: [...document.querySelectorAll('#histograms [id^="row"]')].map(box),
    imgs: document.querySelectorAll('img').length,
  });
})()
"""


def _apart(boxes: list[list[float]]) -> bool:
    """No two boxes overlap horizontally (sorted left to right)."""
    spans = sorted((b[0], b[2]) for b in boxes)
    return all(a[1] <= b[0] + 0.5 for a, b in zip(spans, spans[1:]))


def test_reports_browser_pathology_figures_as_drawn(tmp_path: Path, chromium_page: Callable[..., object]) -> None:
    from .conftest import pathology_run

    _, report = pathology_run()
    path = report.save_html(tmp_path / "pathology.html")
    result = chromium_page(path, width=1280, height=900, script=_LAYOUT)
    _assert_clean(result, path)
    got = json.loads(result.values["script"])
    # Three zero-gradient layers, one constant (dead) output: each a mark with a visible box inside its figure.
    assert len(got["zeroGrad"]) == 3 and len(got["zeroAct"]) == 1
    fl, ft, fr, fb = got["flow"]
    for left, top, right, bottom in got["zeroGrad"] + got["zeroAct"]:
        assert right - left > 2 and bottom - top > 2
        assert fl <= left and right <= fr and ft <= top and bottom <= fb
    # The zero marks sit at the bottom of their panel, below every other point of the chart.
    assert min(b[1] for b in got["zeroGrad"]) > ft + 0.6 * (fb - ft)
    assert all(n is not None for n in got["names"]) and _apart(got["names"])
    assert len(got["bars"]) == 3 and _apart(got["bars"])
    assert len(got["rows"]) == len(report.layers)
    assert got["imgs"] == 0


def test_reports_browser_notebook_view(tmp_path: Path, chromium_page: Callable[..., object]) -> None:
    """The notebook view in a page: names render as text, nothing runs, nothing is fetched."""
    from dataclasses import replace

    import torch

    import actdiag

    from .conftest import DeepNet, hand_findings

    report = replace(actdiag.inspect(DeepNet(depth=4), torch.randn(32, 16)), findings=hand_findings())
    path = tmp_path / "notebook.html"
    path.write_text(f"<!DOCTYPE html><html><body>{report._repr_html_()}</body></html>")
    script = (
        "JSON.stringify({imgs: document.querySelectorAll('img').length, rows: document.querySelectorAll('tr').length,"
        " text: document.body.innerText.includes('<img src=x onerror=alert(1)>')})"
    )
    result = chromium_page(path, script=script)
    _assert_clean(result, path)
    got = json.loads(result.values["script"])
    assert got == {"imgs": 0, "rows": len(report.layers) + 1, "text": True}
    assert _not_blank(result.screenshot) > 10.0
