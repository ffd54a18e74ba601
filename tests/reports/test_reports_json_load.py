"""Reading a saved JSON report back (actdiag.reports.json.load_json): save -> load -> save gives the same document,
and what is not a report of this schema is one clear ReportReadError."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import actdiag
from actdiag.errors import ReportReadError
from actdiag.reports.json import SCHEMA, _m2_for, dumps, load_json, loads
from tests.zoo import DeadReluNet, NaNNet, SaturatedTanhNet, example


def _roundtrip(report: actdiag.Report, tmp_path: Path) -> None:
    first = tmp_path / "first.json"
    report.save_json(first)
    loaded = load_json(first)
    second = tmp_path / "second.json"
    loaded.save_json(second)
    assert second.read_text() == first.read_text()
    # And the loaded Report reads like the original where it matters to the sinks.
    assert [f.code for f in loaded.findings] == [f.code for f in report.findings]
    assert [layer.label for layer in loaded.layers] == [layer.label for layer in report.layers]
    for a, b in zip(loaded.layers, report.layers, strict=True):
        if b.activation is not None:
            assert a.activation is not None
            assert a.activation.count == b.activation.count
            assert a.activation.zero_fraction == b.activation.zero_fraction
            assert (a.activation.std == b.activation.std) or (
                math.isnan(a.activation.std) and math.isnan(b.activation.std)
            )


@pytest.mark.parametrize("make", [DeadReluNet, SaturatedTanhNet, NaNNet], ids=lambda c: c.__name__)
def test_inspect_report_roundtrips(make: type[nn.Module], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = make()
    report = actdiag.inspect(model, example(model), steps=2, optimizer=torch.optim.SGD(model.parameters(), lr=0.01))
    assert report.findings  # each is a pathology: the findings, their fixes and evidence travel too
    _roundtrip(report, tmp_path)


def test_nonfinite_values_become_null_and_back(tmp_path: Path) -> None:
    model = NaNNet()
    report = actdiag.inspect(model, example(model))
    doc = json.loads(dumps(report))
    assert any(item["activation"]["mean"] is None for item in doc["layers"])  # a layer with no finite value
    _roundtrip(report, tmp_path)


def test_watch_report_with_history_roundtrips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SaturatedTanhNet(width=32, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = example(model)
    with actdiag.watch(model, every=2) as monitor:
        for _ in range(9):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    report = monitor.report()
    assert report.history is not None and len(report.history.steps) == 5
    _roundtrip(report, tmp_path)
    loaded = load_json(tmp_path / "first.json")
    assert loaded.history is not None and loaded.history.steps == report.history.steps
    # The latest record's step is the history's last step.
    assert {layer.step for layer in loaded.layers} == {report.history.steps[-1]}


def test_try_fixes_report_roundtrips(tmp_path: Path) -> None:
    """Verified fixes carry before/after evidence: they survive the trip too."""
    model = DeadReluNet()
    report = actdiag.inspect(model, example(model), try_fixes=True)
    assert any(fix.verified is not None for f in report.findings for fix in f.fixes)
    _roundtrip(report, tmp_path)


def test_loaded_report_renders_html(tmp_path: Path) -> None:
    model = DeadReluNet()
    actdiag.inspect(model, example(model)).save_json(tmp_path / "r.json")
    html = load_json(tmp_path / "r.json").save_html(tmp_path / "r.html")
    assert "dead_relu" in html.read_text()


@settings(max_examples=300, deadline=None)
@given(
    st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False),
    st.integers(min_value=1, max_value=2**40),
)
def test_std_survives_the_trip(m2_per_count: float, count: int) -> None:
    """A std the writer can produce (sqrt(m2 / count)) comes back exactly from the loader's m2."""
    std = math.sqrt((m2_per_count * count) / count)
    assert math.sqrt(_m2_for(std, count) / count) == std


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{", "it is not JSON"),
        ("[]", "it is not an actdiag report"),
        ('{"schema": "other/1"}', "it is not an actdiag report (schema 'other/1')"),
        ('{"schema": "actdiag.report/2"}', f"this actdiag reads {SCHEMA!r}"),
        (json.dumps({"schema": SCHEMA, "model": {"name": "N", "parameters": 1}}), "the key 'run' is missing"),
        (
            json.dumps(
                {
                    "schema": SCHEMA,
                    "model": {"name": "N", "parameters": 1},
                    "run": {"steps": 1, "device": "cpu", "torch": "x", "actdiag": "y"},
                    "layers": [{"name": "a", "type": "Linear", "activation": {"count": "many"}}],
                    "findings": [],
                }
            ),
            "damaged",
        ),
    ],
)
def test_bad_documents(text: str, expected: str) -> None:
    with pytest.raises(ReportReadError) as info:
        loads(text)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ReportReadError, match="does not exist"):
        load_json(tmp_path / "missing.json")
    with pytest.raises(ReportReadError, match="is a directory"):
        load_json(tmp_path)
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"\x80\x81")
    with pytest.raises(ReportReadError, match=f"cannot read {junk}: .*not UTF-8"):
        load_json(junk)
