"""actdiag's TensorBoard plugin in TensorBoard's own WSGI app (werkzeug test client) over a logdir that a real
`actdiag.watch` wrote: the tab is listed and active, its routes return what the watch measured, bad queries get a
400 naming the problem, and a logdir without actdiag data leaves the tab inactive without an error."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from actdiag.hooks.sampling import SMALL_SAMPLE
from actdiag.reports.tbplugin import SAMPLES_KEPT, ActdiagLoader
from actdiag.reports.tensorboard import BLOB_SCHEMA, layer_tag

from ._tbplugin import plain_run, tensorboard_client, watched_run
from .conftest import XSS_NAME


def _get(client: Any, path: str) -> tuple[int, Any]:
    resp = client.get(path)
    body = resp.get_data(as_text=True)
    return resp.status_code, (json.loads(body) if resp.status_code == 200 else body)


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    logdir = tmp_path_factory.mktemp("runs") / "watched"
    monitor = watched_run(logdir)
    return tensorboard_client(logdir), monitor.report()


def test_reports_tensorboard_plugin_listed_and_active(watched: tuple[Any, Any]) -> None:
    client, _ = watched
    status, listing = _get(client, "/data/plugins_listing")
    assert status == 200
    entry = listing["actdiag"]
    assert entry["enabled"] is True and entry["tab_name"] == "actdiag"
    assert entry["loading_mechanism"] == {"type": "IFRAME", "module_path": "/data/plugin/actdiag/index.js"}
    # The other tabs are still there and still have their data.
    assert listing["scalars"]["enabled"] and listing["histograms"]["enabled"] and listing["text"]["enabled"]

    resp = client.get("/data/plugin/actdiag/index.js")
    assert resp.status_code == 200 and resp.mimetype == "text/javascript"
    js = resp.get_data(as_text=True)
    assert "export async function render" in js
    assert not any(f"{sink} =" in js or f"{sink}(" in js for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML"))

    entry_page = client.get("/data/plugin_entry.html?name=actdiag").get_data(as_text=True)
    assert '<base href="plugin/actdiag/" />' in entry_page and "./index.js" in entry_page


def test_reports_tensorboard_plugin_routes_serve_the_watch(watched: tuple[Any, Any]) -> None:
    client, report = watched
    status, runs = _get(client, "/data/plugin/actdiag/runs")
    assert status == 200
    assert runs == [{"run": ".", "steps": 28, "report": True}]  # 30 steps, every 2: recorded at 0, 2, ..., 28

    status, got = _get(client, "/data/plugin/actdiag/report?run=.")
    assert status == 200 and got["schema"] == BLOB_SCHEMA
    codes = [(f["code"], f["layer"]) for f in got["findings"]]
    assert codes[0] == ("dead_relu", XSS_NAME)  # the error first
    assert ("saturation", "act1") in codes
    ranked = sorted(report.findings, key=lambda f: -f.rank)  # stable: the rules' order within a severity
    assert codes == [(f.code, f.layer) for f in ranked]
    assert all(fx["snippet"] for f in got["findings"] for fx in f["fixes"])

    status, prof = _get(client, "/data/plugin/actdiag/profile?run=.")
    assert status == 200
    assert prof["steps"] == list(range(0, 30, 2))  # all 15 kept
    last = prof["profiles"][-1]
    assert [row["layer"] for row in last["layers"]] == [layer_tag(ly.label) for ly in report.layers]
    for row, layer in zip(last["layers"], report.layers):
        assert layer.activation is not None
        assert row["act_std"] == pytest.approx(layer.activation.std, rel=1e-12)
        assert row["act_abs_max"] == pytest.approx(layer.activation.abs_max, rel=1e-12)
        if layer.gradient is not None:
            assert row["grad_rms"] == pytest.approx(layer.gradient.rms, rel=1e-12, abs=0.0)
    rows = {row["layer"]: row for row in last["layers"]}
    assert rows[XSS_NAME]["dead_fraction"] == 1.0
    assert rows["fc1"]["grad_rms"] == 0.0  # behind the dead layer: exactly zero, kept as a zero
    assert rows["act1"]["saturation"] > 0.5 and rows["act1"]["dead_fraction"] is None

    status, hist = _get(client, "/data/plugin/actdiag/histograms?run=.&kind=activations&step=5")
    assert status == 200
    assert [h["layer"] for h in hist["layers"]] == [layer_tag(ly.label) for ly in report.layers]
    for h in hist["layers"]:
        assert h["step"] == 6  # the nearest recorded step, the later one on a tie
        # every=2 estimates: a small tensor over SMALL_SAMPLE elements is binned from a sample of that many
        numel = 64 * (4 if h["layer"] == "head" else 32)
        assert math.fsum(b[2] for b in h["buckets"]) == pytest.approx(min(numel, SMALL_SAMPLE))
        lefts = [b[0] for b in h["buckets"]]
        assert lefts == sorted(lefts)
    status, ghist = _get(client, "/data/plugin/actdiag/histograms?run=.&kind=gradients&step=28")
    assert status == 200 and {h["step"] for h in ghist["layers"]} == {28}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("profile", "missing query parameter 'run'"),
        ("histograms?run=.&kind=weights&step=0", "kind must be one of activations, gradients, not 'weights'"),
        ("histograms?run=.&kind=activations&step=last", "step must be an integer"),
        ("histograms?run=nope&kind=activations&step=0", "no actdiag data for run 'nope'"),
    ],
)
def test_reports_tensorboard_plugin_bad_queries(watched: tuple[Any, Any], query: str, message: str) -> None:
    client, _ = watched
    status, body = _get(client, f"/data/plugin/actdiag/{query}")
    assert status in (400, 404)
    assert message in body


def test_reports_tensorboard_plugin_unknown_run_is_empty_not_an_error(watched: tuple[Any, Any]) -> None:
    client, _ = watched
    assert _get(client, "/data/plugin/actdiag/report?run=nope") == (200, None)
    assert _get(client, "/data/plugin/actdiag/profile?run=nope") == (200, {"steps": [], "profiles": []})


def test_reports_tensorboard_plugin_inactive_without_actdiag_data(tmp_path: Path) -> None:
    plain_run(tmp_path / "plain")
    client = tensorboard_client(tmp_path / "plain")
    status, listing = _get(client, "/data/plugins_listing")
    assert status == 200
    assert listing["actdiag"]["enabled"] is False
    assert listing["scalars"]["enabled"] is True  # the logdir does have data, just not actdiag's
    assert _get(client, "/data/plugin/actdiag/runs") == (200, [])


def test_reports_tensorboard_plugin_keeps_more_samples_unless_told() -> None:
    loader = ActdiagLoader()
    flags = argparse.Namespace(samples_per_plugin={"images": 3})
    loader.fix_flags(flags)
    assert flags.samples_per_plugin == {"images": 3, "actdiag": SAMPLES_KEPT}
    flags = argparse.Namespace(samples_per_plugin={"actdiag": 7})
    loader.fix_flags(flags)
    assert flags.samples_per_plugin == {"actdiag": 7}  # the user's own setting wins


def test_reports_tensorboard_plugin_lists_only_runs_with_actdiag_data(tmp_path: Path) -> None:
    watched_run(tmp_path / "runs" / "b_watched", steps=4)
    plain_run(tmp_path / "runs" / "a_plain")
    watched_run(tmp_path / "runs" / "c_watched", steps=2)
    client = tensorboard_client(tmp_path / "runs")
    assert _get(client, "/data/plugins_listing")[1]["actdiag"]["enabled"] is True
    status, runs = _get(client, "/data/plugin/actdiag/runs")
    assert status == 200
    assert runs == [{"run": "b_watched", "steps": 2, "report": True}, {"run": "c_watched", "steps": 0, "report": True}]
    assert _get(client, "/data/plugin/actdiag/profile?run=a_plain") == (200, {"steps": [], "profiles": []})
    assert _get(client, "/data/plugin/actdiag/profile?run=c_watched")[1]["steps"] == [0]
