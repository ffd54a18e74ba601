"""Ctrl-C (SIGINT) or SIGTERM during a watched run flushes what was recorded: sink events and the JSON report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from . import rel_signal_worker as worker

pytest.importorskip("actdiag.reports.json")

WORKER = Path(worker.__file__)
ROOT = WORKER.parents[2]  # the repository root, so that the workers import this checkout of actdiag


def _scalars(logdir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [e.step for e in acc.Scalars("act_std/0")]


def _start(out: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_rel_sigterm_and_sigint_flush_what_was_recorded(tmp_path: Path) -> None:
    runs = {signal.SIGTERM: tmp_path / "term", signal.SIGINT: tmp_path / "int"}
    procs = {}
    for sig, out in runs.items():
        out.mkdir()
        procs[sig] = _start(out)  # both at once: the imports dominate the time
    deadline = time.monotonic() + 120
    for sig, out in runs.items():
        while not (out / "ready").exists():
            assert procs[sig].poll() is None, procs[sig].communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "worker never got ready"
            time.sleep(0.05)
        procs[sig].send_signal(sig)
    for sig, out in runs.items():
        log = procs[sig].communicate(timeout=60)[0].decode(errors="replace")
        if sig == signal.SIGTERM:
            assert procs[sig].returncode == 128 + signal.SIGTERM, log  # SystemExit(143), after the flush
        else:
            assert procs[sig].returncode in (-signal.SIGINT, 1, 130), log  # KeyboardInterrupt
        doc = json.loads((out / "report.json").read_text())
        recorded = doc["run"]["steps"]
        assert recorded >= 5
        assert [layer["name"] for layer in doc["layers"]] == ["0", "1", "2"]
        # every recorded step reached the events file, although the writer only flushes on close
        steps = _scalars(out / "tb")
        assert len(steps) >= 5 and steps == sorted(set(steps))
        if (out / "tb_actdiag").exists():  # actdiag's own TensorBoard sink, where it is installed
            assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb_actdiag").rglob("*"))
