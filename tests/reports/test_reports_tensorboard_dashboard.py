"""actdiag's dashboard end to end: a real `tensorboard --logdir` subprocess on 127.0.0.1 (with its default data
loader) finds the plugin through its entry point, lists the tab and answers its routes; headless Chromium, driven
over the DevTools pipe, opens the tab's page as TensorBoard's iframe does and renders the findings and the charts
with no console error, no request leaving the server, and a module named as markup shown as text. A logdir without
actdiag data: the tab is inactive and its page says so, without an error. Servers and browsers are always killed."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64decode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ._tbplugin import PYTHON, plain_run, tensorboard_env, watched_run
from .conftest import XSS_NAME, PageResult, collect_events, devtools_page, free_port
from .test_reports_browser import _not_blank

pytestmark = pytest.mark.browser

STARTUP_LIMIT_S = 90.0
RENDER_LIMIT_S = 30.0


def _get(base: str, path: str) -> Any:
    with urllib.request.urlopen(f"{base}{path}", timeout=10) as resp:
        return json.loads(resp.read().decode())


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """Start `tensorboard --logdir DIR` on a free port of 127.0.0.1; wait until `ready(base)` holds; its base URL."""
    servers: list[subprocess.Popen[bytes]] = []

    def start(logdir: Path, ready: Any) -> str:
        port = free_port()
        cmd = [PYTHON, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--reload_interval", "1"]
        server = subprocess.Popen(cmd, env=tensorboard_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        servers.append(server)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while time.monotonic() < deadline:
            if server.poll() is not None:
                err = server.stderr.read().decode()[-2000:] if server.stderr else ""
                pytest.fail(f"tensorboard exited: {err}")
            try:
                if ready(base):
                    return base
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        pytest.fail(f"tensorboard was not ready within {STARTUP_LIMIT_S} s")

    try:
        yield start
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=30)
            if server.stderr:
                server.stderr.close()


def open_page(url: str, profile: Path, *scripts: str, width: int = 1300, height: int = 1000) -> PageResult:
    """Load `url` in headless Chromium, wait until the dashboard says it is done (`body[data-state]` is ready, empty
    or error), run each script in turn (a short pause after each, for what it set off) and collect console errors,
    exceptions, requests, dialogs and a screenshot. `values["scripts"]` holds what the scripts returned."""
    with devtools_page(profile, width, height) as (pipe, session):
        pipe.call("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired")

        def evaluate(expr: str) -> Any:
            got = pipe.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=session)
            return got.get("result", {}).get("value")

        deadline = time.monotonic() + RENDER_LIMIT_S
        state = None
        while time.monotonic() < deadline:
            state = evaluate("document.body ? document.body.dataset.state || '' : ''")
            if state in ("ready", "empty", "error"):
                break
            pipe.drain(0.2)
        result = PageResult()
        result.values["state"] = state
        result.values["scripts"] = []
        for script in scripts:
            result.values["scripts"].append(evaluate(script))
            pipe.drain(0.5)
        shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)
        result.screenshot = b64decode(shot["data"])
        # Opened as a top-level page (TensorBoard shows it in an iframe), Chromium asks the server for
        # /favicon.ico, which TensorBoard does not have: the browser's request, not the dashboard's.
        collect_events(pipe.events, result, ignore_log=lambda entry: entry.get("url", "").endswith("/favicon.ico"))
        return result


def _assert_clean(result: PageResult, base: str) -> None:
    assert result.console_errors == [], "\n".join(result.requests)
    assert result.exceptions == []
    assert result.dialogs == []  # the markup in the module name never ran
    assert result.requests, "the page made no request at all"
    assert [u for u in result.requests if not u.startswith(base + "/")] == []  # nothing leaves the server


PAGE_SCRIPT = """JSON.stringify({
  findings: [...document.querySelectorAll('article.finding')].map(a => ({
      code: a.querySelector('.code').textContent, layer: a.querySelector('.layer').textContent})),
  imgs: document.querySelectorAll('img').length,
  xssText: [...document.querySelectorAll('svg text')].some(t => t.firstChild.nodeValue === XSS_NAME_JSON),
  profileMarks: document.querySelectorAll('svg.profile circle, svg.profile rect, svg.profile path').length,
  heatmaps: document.querySelectorAll('svg.heatmap').length,
  histRows: document.querySelectorAll('svg.histograms path').length,
  slider: (() => { const s = document.getElementById('step'); s.value = 0;
                   s.dispatchEvent(new Event('input')); return s.max; })(),
  stepLabel: document.querySelector('.controls .meta').textContent,
  copy: (() => { document.querySelector('button.copy').click(); return 'clicked'; })(),
})""".replace("XSS_NAME_JSON", json.dumps(XSS_NAME))
AFTER_SCRIPT = "JSON.stringify({copy: document.querySelector('button.copy').textContent})"


def test_reports_tensorboard_dashboard_renders_in_chromium(tmp_path: Path, serve: Any) -> None:
    logdir = tmp_path / "runs" / "watched"
    monitor = watched_run(logdir)
    expected = [(f.code, f.layer) for f in sorted(monitor.findings, key=lambda f: -f.rank)]
    assert expected[0] == ("dead_relu", XSS_NAME)

    base = serve(logdir, lambda b: _get(b, "/data/plugin/actdiag/runs") == [{"run": ".", "steps": 28, "report": True}])
    listing = _get(base, "/data/plugins_listing")
    assert listing["actdiag"]["enabled"] is True
    assert listing["actdiag"]["loading_mechanism"]["module_path"] == "/data/plugin/actdiag/index.js"
    assert _get(base, "/data/plugin/actdiag/profile?run=.")["steps"] == list(range(0, 30, 2))  # all 15 kept
    assert listing["histograms"]["enabled"] and listing["text"]["enabled"]  # the other tabs keep working

    result = open_page(f"{base}/data/plugin_entry.html?name=actdiag", tmp_path / "chromium", PAGE_SCRIPT, AFTER_SCRIPT)
    assert result.values["state"] == "ready"
    _assert_clean(result, base)
    values = json.loads(result.values["scripts"][0]) | json.loads(result.values["scripts"][1])
    assert [(f["code"], f["layer"]) for f in values["findings"]] == expected
    assert values["imgs"] == 0 and values["xssText"] is True
    assert values["profileMarks"] > 7 and values["heatmaps"] == 2 and values["histRows"] == 7
    assert values["slider"] == "14" and values["stepLabel"].startswith("step 0 (1 of 15")
    assert values["copy"] in ("Copied", "Select and press Ctrl+C")
    assert _not_blank(result.screenshot) > 10.0


def test_reports_tensorboard_dashboard_inactive_without_actdiag_data(tmp_path: Path, serve: Any) -> None:
    logdir = tmp_path / "runs" / "plain"
    plain_run(logdir)
    base = serve(logdir, lambda b: "loss" in _get(b, "/data/plugin/scalars/tags").get(".", {}))
    listing = _get(base, "/data/plugins_listing")
    assert listing["actdiag"]["enabled"] is False and listing["scalars"]["enabled"] is True
    assert _get(base, "/data/plugin/actdiag/runs") == []
    first_note = "document.querySelector('main p').textContent"
    result = open_page(f"{base}/data/plugin_entry.html?name=actdiag", tmp_path / "chromium", first_note)
    assert result.values["state"] == "empty"
    assert result.values["scripts"][0].startswith("No actdiag data in this logdir")
    _assert_clean(result, base)
