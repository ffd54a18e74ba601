"""Notebook views: `repr()` of a Report, Monitor and Finding is a line, not the records; `_repr_html_` shows the
findings and the depth profile, bounded in size, self-contained, with every name from user code escaped."""

from __future__ import annotations

from dataclasses import replace
from html.parser import HTMLParser

import torch
from torch import nn

import actdiag
from actdiag.records import Report
from actdiag.reports.notebook import MAX_PROFILE_ROWS

from .conftest import XSS_NAME, DeepNet, hand_findings, pathology_run


class _Tags(HTMLParser):
    """Every start tag and attribute name, to check what a notebook would render as markup."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs.update(name for name, _ in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    return parser


def _assert_self_contained(html: str) -> _Tags:
    parsed = _parse(html)
    # No script, no fetched resource, no stylesheet that would restyle the rest of the notebook, no handlers.
    assert not {"script", "img", "style", "link", "iframe", "object", "svg"} & set(parsed.tags)
    assert parsed.attrs <= {"style", "open"}
    assert "http" not in html and "url(" not in html
    return parsed


def _watched(model: nn.Module, x: torch.Tensor, steps: int = 4) -> Report:
    with actdiag.watch(model, every=1) as monitor:
        for _ in range(steps):
            model(x).square().mean().backward()
            model.zero_grad()
            monitor.step()
    return monitor.report()


def test_reports_notebook_repr_is_a_line() -> None:
    """A 17-layer watch report with history: its repr is a line, not the records."""
    model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(32, 32), nn.ReLU())], nn.Linear(32, 2))
    report = _watched(model, torch.randn(64, 32))
    assert len(report.layers) == 17 and report.history is not None
    text = repr(report)
    assert len(text) < 300 and "\n" not in text
    assert text.startswith("<actdiag.Report 'Sequential': 17 layers, 4 of 4 steps recorded, ")
    # The default dataclass repr (every histogram of every step) is what this replaced.
    assert len(object.__repr__(report)) < 100 and len(str(report.layers)) > 20_000


def test_reports_notebook_repr_names_findings() -> None:
    _, report = pathology_run()
    text = repr(report)
    listed = ", ".join(f"{f.severity} {f.code} at {f.layer!r}" for f in report.findings)
    assert text == (
        f"<actdiag.Report 'PathologyNet': 7 layers, 6 of 6 steps recorded, {len(report.findings)} findings: {listed}>"
    )
    assert listed.startswith("error dead_relu at 'act1', ") and "warning saturation at 'act0'" in listed
    f = next(f for f in report.findings if f.code == "dead_relu")
    line = repr(f)
    assert line.startswith(f"Finding({f.severity} dead_relu at 'act1': ") and len(line) < 400
    assert f"fixes: {', '.join(x.code for x in f.fixes)}" in line
    many = replace(report, findings=report.findings * 5)
    assert f"and {len(many.findings) - 3} more>" in repr(many)  # three named, the rest counted


def test_reports_notebook_html_escapes_names_and_messages() -> None:
    report = replace(actdiag.inspect(DeepNet(depth=4), torch.randn(32, 16)), findings=hand_findings())
    html = report._repr_html_()
    parsed = _assert_self_contained(html)
    assert XSS_NAME not in html and "<b>bold?</b>" not in html
    text = "".join(parsed.text)
    assert XSS_NAME in text  # shown as text, in the findings and the depth profile
    assert html.count("&lt;img src=x onerror=alert(1)&gt;") >= 2
    # Findings first, most severe first; then one profile row per layer in forward order.
    assert text.index("vanishing_gradient") < text.index("dead_relu") < text.index("fp16_underflow")
    labels = [ly.label for ly in report.layers]
    positions = [text.index(lb, text.index("depth profile")) for lb in labels[:-1]]
    assert positions == sorted(positions)
    finding = hand_findings()[0]
    one = finding._repr_html_()
    _assert_self_contained(one)
    assert "&lt;/code&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in one  # the snippet, as text to copy
    assert "<script>" not in one


def test_reports_notebook_html_marks_zero_gradients() -> None:
    _, report = pathology_run()
    html = report._repr_html_()
    _assert_self_contained(html)
    body = html[html.index("depth profile") :]
    rows = body.split("<tr")[2:]  # after the header row
    assert len(rows) == len(report.layers)
    for row, ly in zip(rows, report.layers):
        assert ly.gradient is not None
        assert (">0</span>" in row) == (
            ly.gradient.rms == 0.0 or (ly.activation is not None and ly.activation.std == 0)
        )
    assert "100.0%" in rows[3]  # act1: all units dead


def test_reports_notebook_html_stays_small_for_big_models() -> None:
    """500 layers: the profile is capped (flagged layers first), and the view stays under 200 kB."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(250)])
    report = actdiag.inspect(model, torch.randn(8, 8))
    assert len(report.layers) == 500
    html = report._repr_html_()
    _assert_self_contained(html)
    assert len(html.encode()) < 200_000
    assert f"({MAX_PROFILE_ROWS} of 500: flagged first, the rest by depth)" in html
    assert html.count("<tr") == MAX_PROFILE_ROWS + 1
    assert len(repr(report)) < 300


def test_reports_notebook_monitor() -> None:
    model = DeepNet(depth=2)
    x = torch.randn(16, 16)
    with actdiag.watch(model, every=2) as monitor:
        assert repr(monitor) == "<actdiag.Monitor 'DeepNet': watching, every 2 steps, 0 steps, 0 recorded>"
        assert "no step recorded yet" in monitor._repr_html_()
        for _ in range(3):
            model(x).sum().backward()
            model.zero_grad()
            monitor.step()
        assert monitor._findings_cache is None  # repr never ran the rules
    assert repr(monitor) == "<actdiag.Monitor 'DeepNet': closed, every 2 steps, 3 steps, 2 recorded>"
    html = monitor._repr_html_()
    _assert_self_contained(html)
    assert "2 of 3 steps recorded" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
