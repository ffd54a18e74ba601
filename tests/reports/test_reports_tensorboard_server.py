"""A real `tensorboard --logdir` on 127.0.0.1 serves what the sink wrote: a histogram, a scalar and the findings text,
asked for over its HTTP data API. The server is always killed; every wait is bounded."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import actdiag
from actdiag.records import StepRecord
from actdiag.reports.tensorboard import TensorBoardSink

from .conftest import DeepNet, free_port, hand_findings

STARTUP_LIMIT_S = 90.0


def _get(base: str, path: str, **query: str) -> Any:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read().decode())


def test_reports_tensorboard_server_serves_histogram(tmp_path: Path) -> None:
    logdir = tmp_path / "runs" / "x"
    model = DeepNet(depth=2)
    x = torch.randn(32, 16)
    act = {}
    handle = model.blocks["fc1"].register_forward_hook(lambda m, i, o: act.__setitem__("y", o.detach().double()))
    report = replace(actdiag.inspect(model, x), findings=hand_findings())  # the rules are not in yet
    handle.remove()
    sink = TensorBoardSink(logdir)
    sink.on_record(StepRecord(step=0, layers=report.layers, params=report.params))
    sink.on_close(report)
    ref = act["y"].numpy().ravel()

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load_fast",
        "false",
        "--reload_interval",
        "1",
    ]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        tags: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"tensorboard exited: {server.stderr.read().decode()[-2000:] if server.stderr else ''}")
            try:
                tags = _get(base, "/data/plugin/histograms/tags")
                if tags.get(".", {}).get("activations/blocks.fc1"):
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard did not serve the histogram within {STARTUP_LIMIT_S} s")

        runs = _get(base, "/data/runs")
        assert runs == ["."]  # the logdir is the run: no sub-runs
        assert {f"activations/{ly.label}" for ly in report.layers} <= set(tags["."])
        series = _get(base, "/data/plugin/histograms/histograms", run=".", tag="activations/blocks.fc1")
        # [wall_time, step, [[left, right, count], ...]]
        (wall, step, buckets) = series[0]
        assert step == 0
        counts = np.array([b[2] for b in buckets])
        assert counts.sum() == pytest.approx(ref.size)
        assert buckets[0][0] == pytest.approx(ref.min(), rel=1e-5)
        assert buckets[-1][1] == pytest.approx(ref.max(), rel=1e-5)

        scalars = _get(base, "/data/plugin/scalars/scalars", run=".", tag="act_std/blocks.fc1")
        assert scalars[0][1] == 0 and scalars[0][2] == pytest.approx(np.std(ref), rel=1e-5)

        text = _get(base, "/data/plugin/text/text", run=".", tag="actdiag/findings")
        (entry,) = text
        assert entry["step"] == 0
        assert "vanishing_gradient" in entry["text"] and "leaky_relu" in entry["text"]
    finally:
        server.kill()
        server.wait(timeout=30)
        if server.stderr:
            server.stderr.close()
