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
