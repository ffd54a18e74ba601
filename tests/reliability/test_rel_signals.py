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

WORKER = Path(worker.__file__)
ROOT = WORKER.parents[2]  # the repository root, so that the workers import this checkout of actdiag


def _scalars(logdir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return [e.step for e in acc.Scalars("act_std/0")]


def _start(out: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(out), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _finish(proc: subprocess.Popen[bytes]) -> str:
    try:
        return proc.communicate(timeout=180)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        log = proc.communicate()[0].decode(errors="replace")
        pytest.fail(f"the worker did not end within 180 s of the signal:\n{log}")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_rel_sigterm_and_sigint_flush_what_was_recorded(tmp_path: Path) -> None:
    runs = {"term": (signal.SIGTERM, ()), "int": (signal.SIGINT, ()), "slow": (signal.SIGTERM, ("slow",))}
    procs = {}
    for name, (_, args) in runs.items():
        (tmp_path / name).mkdir()
        procs[name] = _start(tmp_path / name, *args)  # all at once: the imports dominate the time
    deadline = time.monotonic() + 180
    for name, (sig, _) in runs.items():
        out = tmp_path / name
        ready = out / ("began_6" if name == "slow" else "ready")  # "slow": in the middle of a sink's write
        while not ready.exists():
            assert procs[name].poll() is None, procs[name].communicate()[0].decode(errors="replace")
            assert time.monotonic() < deadline, "worker never got ready"
            time.sleep(0.02)
        procs[name].send_signal(sig)
    for name, (sig, _) in runs.items():
        out = tmp_path / name
        log = _finish(procs[name])
        if sig == signal.SIGTERM:
            assert procs[name].returncode == 128 + signal.SIGTERM, log  # SystemExit(143), after the flush
        else:
            assert procs[name].returncode in (-signal.SIGINT, 1, 130), log  # KeyboardInterrupt
        doc = json.loads((out / "report.json").read_text())
        assert doc["run"]["steps"] >= 5
        assert [layer["name"] for layer in doc["layers"]] == ["0", "1", "2"]
        # every recorded step reached the events file, although the writer only flushes on close
        steps = _scalars(out / "tb")
        assert len(steps) >= 5 and steps == sorted(set(steps))
        if (out / "tb_actdiag").exists():  # actdiag's own TensorBoard sink, where it is installed
            assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb_actdiag").rglob("*"))
    slow = tmp_path / "slow"
    # the signal came while the sink was writing step 6: that write finished, no later step began
    assert (slow / "finished_6").exists() and (slow / "closed").exists()
    assert not (slow / "began_7").exists()
