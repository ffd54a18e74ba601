"""Shared pieces of the report tests: small models, hand-built findings, and a headless Chromium driven over the
DevTools protocol through a pipe (`--remote-debugging-pipe`: JSON messages separated by NUL bytes on file
descriptors 3 and 4), which needs nothing beyond the standard library."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import actdiag
from actdiag.records import Finding, Fix, Report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
XSS_NAME = "<img src=x onerror=alert(1)>"


class DeepNet(nn.Module):
    """`depth` Linear+activation blocks alternating ReLU and Tanh, plus a sigmoid head whose module name is markup
    (layer names are user data and must be escaped everywhere they are shown)."""

    def __init__(self, depth: int = 4, width: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict()
        for i in range(depth):
            self.blocks[f"fc{i}"] = nn.Linear(width, width)
            self.blocks[f"act{i}"] = nn.ReLU() if i % 2 == 0 else nn.Tanh()
        self.add_module(XSS_NAME, nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.blocks.values():
            x = module(x)
        return getattr(self, XSS_NAME)(x)


def hand_findings() -> tuple[Finding, ...]:
    """Findings as the rules will produce them, deliberately out of severity order and full of markup."""
    return (
        Finding(
            code="dead_relu",
            severity="warning",
            layer="blocks.act0",
            message="62% of the units of blocks.act0 never fire <b>bold?</b>",
            evidence={"dead_fraction": 0.625, "units": 16.0},
            fixes=(
                Fix(
                    code="leaky_relu",
                    text="Use LeakyReLU so dead units still pass gradient.",
                    snippet="model.blocks['act0'] = nn.LeakyReLU(0.01)  # </code><script>alert(2)</script>",
                    verified=True,
                    before={"dead_fraction": 0.625},
                    after={"dead_fraction": 0.0},
                ),
                Fix(code="he_init", text="Re-initialise with He init.", snippet="nn.init.kaiming_normal_(w)"),
            ),
            related=("blocks.act2",),
        ),
        Finding(
            code="vanishing_gradient",
            severity="error",
            layer=XSS_NAME,
            message="Gradients shrink by 1e-6 from the head to blocks.fc0 | pipes | too.",
            evidence={"ratio": 1.5e-6},
            fixes=(
                Fix(
                    code="residual_connections",
                    text="Add skip connections.",
                    snippet="x = x + block(x)",
                    verified=False,
                    before={"ratio": 1.5e-6},
                    after={"ratio": 1.1e-6},
                ),
            ),
        ),
        Finding(code="fp16_underflow", severity="info", layer=None, message="Some gradients flush to zero in fp16."),
    )


@pytest.fixture
def small_report() -> Report:
    model = DeepNet(depth=4)
    return actdiag.inspect(model, torch.randn(32, 16))


@pytest.fixture
def watch_report() -> Report:
    """A short training run under watch: several recorded steps, so the report has history."""
    model = DeepNet(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(64, 16), torch.rand(64, 16)
    with actdiag.watch(model, every=2) as monitor:
        for _ in range(12):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    return replace(monitor.report(), findings=hand_findings())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------ chromium
@dataclass
class PageResult:
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    screenshot: bytes = b""
    values: dict[str, Any] = field(default_factory=dict)


class _Pipe:
    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self.proc, self.w, self.r = proc, to_browser, from_browser
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer over the DevTools pipe")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        msg: dict[str, Any] = json.loads(raw)
        return msg

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 30
        while True:
            got = self._read_message(deadline)
            if got.get("id") == self.next_id:
                if "error" in got:
                    raise RuntimeError(f"{method}: {got['error']}")
                result: dict[str, Any] = got.get("result", {})
                return result
            self.events.append(got)

    def wait_event(self, method: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while True:
            ev = self._read_message(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return ev

    def drain(self, seconds: float) -> None:
        """Collect events for a short while (late console messages, requests started after load)."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_message(deadline))
        except TimeoutError:
            pass


@contextmanager
def devtools_page(
    profile: Path, width: int, height: int, procs: list[subprocess.Popen[bytes]] | None = None
) -> Iterator[tuple[_Pipe, str]]:
    """Headless Chromium driven over its DevTools pipe, with one blank page whose Page, Runtime, Log and Network
    events are enabled (and none collected yet): (pipe, session id). The browser is always killed."""
    assert CHROMIUM is not None, "chromium is not installed (Debian: apt-get install chromium)"
    to_r, to_w = os.pipe()  # we write commands to to_w; chromium reads fd 3
    from_r, from_w = os.pipe()  # chromium writes fd 4; we read from_r

    def child_fds() -> None:
        # Move both ends above 4 first: either could itself be fd 3 or 4 and be clobbered by the other dup2.
        a, b = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)

    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--remote-debugging-pipe",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    proc = subprocess.Popen(
        args,
        preexec_fn=child_fds,
        pass_fds=(3, 4),  # kept open through exec (the close-fds sweep runs after preexec_fn)
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if procs is not None:
        procs.append(proc)
    os.close(to_r)
    os.close(from_w)
    pipe = _Pipe(proc, to_w, from_r)
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.events.clear()
        yield pipe, session
    finally:
        os.close(to_w)
        os.close(from_r)
        proc.kill()
        proc.wait(timeout=30)


def collect_events(
    events: list[dict[str, Any]], result: PageResult, ignore_log: Callable[[dict[str, Any]], bool] = lambda e: False
) -> None:
    """Sort a page's DevTools events into `result`: console errors (log entries for which `ignore_log` is false),
    uncaught exceptions, requests and dialogs."""
    for ev in events:
        method, params = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            result.console_errors.append(json.dumps(params.get("args")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            if not ignore_log(params["entry"]):
                result.console_errors.append(params["entry"].get("text", ""))
        elif method == "Runtime.exceptionThrown":
            result.exceptions.append(json.dumps(params.get("exceptionDetails")))
        elif method == "Network.requestWillBeSent":
            result.requests.append(params["request"]["url"])
        elif method == "Page.javascriptDialogOpening":
            result.dialogs.append(params.get("message", ""))


@pytest.fixture
def chromium_page(tmp_path: Path) -> Iterator[Callable[..., PageResult]]:
    """Load a local HTML file in headless Chromium; report console errors, exceptions, requests, dialogs and a
    screenshot. The browser is always killed."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")
    procs: list[subprocess.Popen[bytes]] = []

    def load(path: Path, width: int = 1280, height: int = 900, script: str | None = None) -> PageResult:
        with devtools_page(tmp_path / f"chromium-profile-{len(procs)}", width, height, procs) as (pipe, session):
            pipe.call("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
            pipe.wait_event("Page.loadEventFired")
            pipe.drain(0.5)
            result = PageResult()
            if script is not None:
                got = pipe.call("Runtime.evaluate", {"expression": script, "returnByValue": True}, session=session)
                result.values["script"] = got.get("result", {}).get("value")
                pipe.drain(0.3)
            shot = pipe.call("Page.captureScreenshot", {"format": "png"}, session=session)
            result.screenshot = base64.b64decode(shot["data"])
            collect_events(pipe.events, result)
            return result

    try:
        yield load
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


class PathologyNet(nn.Module):
    """Every unit-health pathology the report draws, in one small model:

    - `fc0`'s weights are scaled up, so `act0` (Tanh) piles up at -1 and +1 (saturated);
    - `fc1` is shifted to -100, so `act1` (ReLU) is 100% dead and every layer before it (`fc0`, `act0`, `fc1`)
      receives a gradient of exactly zero;
    - `fc2`, `act2` (ReLU) and the `head` are healthy.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc0, self.act0 = nn.Linear(width, width), nn.Tanh()
        self.fc1, self.act1 = nn.Linear(width, width), nn.ReLU()
        self.fc2, self.act2 = nn.Linear(width, width), nn.ReLU()
        self.head = nn.Linear(width, 4)
        with torch.no_grad():
            self.fc0.weight.mul_(30.0)
            self.fc1.bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.fc0(x))
        x = self.act1(self.fc1(x))
        x = self.act2(self.fc2(x))
        return self.head(x)


def pathology_run() -> tuple[PathologyNet, Report]:
    """PathologyNet trained for a few recorded steps under watch (so the report has history and weight norms)."""
    torch.manual_seed(0)
    model = PathologyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, weight_decay=0.1)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    with actdiag.watch(model, every=1) as monitor:
        for _ in range(6):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    return model, monitor.report()
