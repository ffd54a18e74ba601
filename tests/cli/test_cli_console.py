"""The terminal summary (actdiag.reports.console): table, verdict, colour rules, rich optional, progress bar."""

from __future__ import annotations

import importlib.util
import io
import sys

from actdiag.records import Finding, Fix, LayerStats, ModelInfo, Report, RunInfo
from actdiag.reports import console


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _report(*findings: Finding) -> Report:
    return Report(
        model=ModelInfo(name="Net", parameters=1234),
        run=RunInfo(steps=2, recorded_steps=2, device="cpu", torch="x", actdiag="y"),
        layers=(
            LayerStats(name="features.0.conv", type="Conv2d", step=1),
            LayerStats(name="act2", type="ReLU", step=1),
        ),
        findings=findings,
    )


ERR = Finding(
    code="vanishing_gradient",
    severity="error",
    layer="features.0.conv",
    message="gradients shrink 1e6-fold from the head to features.0.conv",
    evidence={"ratio": 1.5e-6, "depth": 12, "grad_norm": 0.25},
    fixes=(
        Fix(
            code="he_init",
            text="initialise the convolutions with He init",
            snippet="nn.init.kaiming_normal_(w)",
            verified=True,
        ),
    ),
    related=("features.1.conv",),
)
WARN = Finding(
    code="dead_relu",
    severity="warning",
    layer="act2",
    message="40% of act2's units never fire",
    evidence={"dead_fraction": 0.4},
)
INFO = Finding(code="fp16_underflow", severity="info", layer=None, message="small values", evidence={})


def test_plain_table_has_every_column_and_ranked_rows() -> None:
    wide = console.format_summary(_report(ERR, WARN, INFO), width=400, color=False)  # nothing wraps
    assert "\x1b[" not in wide
    lines = wide.splitlines()
    header = next(line for line in lines if line.startswith("#"))
    assert header.split() == ["#", "severity", "layer", "what", "evidence", "fix"]
    first = next(line for line in lines if line.startswith("1 "))
    assert first.split()[:5] == ["1", "error", "features.0.conv", "(Conv2d)", "vanishing_gradient"]
    assert "vanishing_gradient" in first and "ratio=1.50e-06" in first
    assert first.endswith("initialise the convolutions with He init (verified: it helps)")
    assert "+1 more" in lines[lines.index(first) + 1] and "depth=12" in lines[lines.index(first) + 1]
    assert "fix for vanishing_gradient at features.0.conv (he_init):" in wide
    assert "    nn.init.kaiming_normal_(w)" in lines
    order = [next(i for i, ln in enumerate(lines) if ln.startswith(f"{k} ")) for k in (1, 2, 3)]
    assert order == sorted(order)
    assert "act2 (ReLU)" in lines[order[1]] and "dead_relu" in lines[order[1]] and "(model)" in lines[order[2]]
    assert lines[-1] == (
        "verdict: 1 error, 1 warning, 1 info in Net, 2 layers, 2 steps; "
        "start with vanishing_gradient at features.0.conv"
    )
    narrow = console.format_summary(_report(ERR, WARN, INFO), width=100, color=False)
    table = [ln for ln in narrow.splitlines() if ln[:1] in "#-123 " and not ln.startswith("    nn.")]
    assert max(len(line) for line in table) <= 100


def test_verdict_without_findings() -> None:
    assert console.verdict(_report()) == "verdict: no problems found in Net, 2 layers, 2 steps"
    assert console.format_summary(_report(), quiet=True) == console.verdict(_report())


def test_colour_only_when_asked(monkeypatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert console.use_color(_Tty()) is True
    assert console.use_color(io.StringIO()) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert console.use_color(_Tty()) is False
    monkeypatch.setenv("NO_COLOR", "")  # no-color.org: only a non-empty value counts
    assert console.use_color(_Tty()) is True
    coloured = console.format_summary(_report(ERR), color=True)
    assert "\x1b[" in coloured


def test_works_without_rich(monkeypatch) -> None:
    if importlib.util.find_spec("rich") is not None:
        assert "┃" in console.findings_table([ERR, WARN], width=100, color=True)  # drawn by rich
    for name in ("rich", "rich.console", "rich.table", "rich.text"):
        monkeypatch.setitem(sys.modules, name, None)  # `import rich...` now raises ImportError
    without = console.findings_table([ERR, WARN], width=100, color=True)
    assert "┃" not in without
    assert "vanishing_gradient" in without and "\x1b[31m" in without


def test_numbers_are_readable() -> None:
    assert console.format_number(1.5e-6) == "1.50e-06"
    assert console.format_number(0.25) == "0.25"
    assert console.format_number(123456.0) == "1.23e+05"
    assert console.format_number(float("nan")) == "nan"
    assert console.format_number(7) == "7"
    assert console.format_evidence({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}, limit=2) == "a=1, b=2, ..."


def test_progress_bar_only_on_a_terminal() -> None:
    piped = io.StringIO()
    bar = console.ProgressBar(piped)
    for i in range(1, 4):
        bar(i, 3)
    bar.close()
    assert piped.getvalue() == ""
    tty = _Tty()
    bar = console.ProgressBar(tty, width=10)
    bar(1, 4)
    assert tty.getvalue().endswith("[##--------] 1/4 steps")
    bar(4, 4)
    bar.close()
    assert "[##########] 4/4 steps" in tty.getvalue()
    assert tty.getvalue().endswith("\r")
