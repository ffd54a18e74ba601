"""Shared pieces of the TensorBoard-plugin tests: a watched run with real findings and a module whose name is
markup, the TensorBoard app in-process, and a way for a `tensorboard` subprocess to find the plugin."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

import actdiag
from actdiag.monitor import Monitor

from .conftest import XSS_NAME

ENTRY_POINT = "actdiag.reports.tbplugin:ActdiagLoader"
WORKTREE = Path(__file__).resolve().parents[2]


class DeadAndSaturatedNet(nn.Module):
    """A tanh layer driven into saturation by weights N(0, 3^2), then a ReLU pushed dead by a bias of -10 (no unit
    ever fires, so nothing before it gets a gradient). The dead ReLU's module name is markup: it is user data."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.act1 = nn.Tanh()
        self.fc2 = nn.Linear(32, 32)
        self.add_module(XSS_NAME, nn.ReLU())
        self.fc3 = nn.Linear(32, 32)
        self.act3 = nn.ReLU()
        self.head = nn.Linear(32, 4)
        with torch.no_grad():
            self.fc1.weight.normal_(0.0, 3.0)
            self.fc2.bias.fill_(-10.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = getattr(self, XSS_NAME)(self.fc2(self.act1(self.fc1(x))))
        return self.head(self.act3(self.fc3(h)))


def watched_run(logdir: Path, steps: int = 30, every: int = 2) -> Monitor:
    """Train DeadAndSaturatedNet under `actdiag.watch(logdir=...)`; the closed monitor. The default records 15
    steps, more than the 10 TensorBoard would keep of a plugin it was not told about."""
    model = DeadAndSaturatedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randn(64, 4, generator=g)
    with actdiag.watch(model, every=every, logdir=logdir) as monitor:
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step()
    return monitor


def plain_run(logdir: Path) -> None:
    """A TensorBoard run with no actdiag data: one scalar from a plain SummaryWriter."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as w:
        for step in range(3):
            w.add_scalar("loss", 1.0 / (step + 1), step)


def tensorboard_client(logdir: Path) -> Any:
    """TensorBoard's whole WSGI app (every default plugin plus actdiag's) over `logdir`, loaded once, in a werkzeug
    test client."""
    from tensorboard import default, program
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_ingester
    from werkzeug.test import Client

    from actdiag.reports.tbplugin import ActdiagLoader

    plugins = default.get_plugins()  # with actdiag installed, its entry point already brings the plugin
    if not any(p is ActdiagLoader or getattr(p, "__name__", "") == ActdiagLoader.__name__ for p in plugins):
        plugins = [*plugins, ActdiagLoader]
    tb = program.TensorBoard(plugins=plugins)
    tb.configure(argv=[None, "--logdir", str(logdir), "--load_fast", "false", "--reload_interval", "0"])
    tb.flags.reload_task = "blocking"
    ingester = data_ingester.LocalDataIngester(tb.flags)
    ingester.start()
    app = application.TensorBoardWSGIApp(
        tb.flags, tb.plugin_loaders, ingester.data_provider, tb.assets_zip_provider, ingester.deprecated_multiplexer
    )
    return Client(app)


def installed_entry_point() -> bool:
    return any(ep.value == ENTRY_POINT for ep in metadata.entry_points(group="tensorboard_plugins"))


def tensorboard_env(tmp_path: Path) -> dict[str, str]:
    """The environment for a `tensorboard` subprocess that loads this checkout's plugin.

    Once actdiag is installed from this pyproject.toml its entry point is found as it is for a user. An install
    from before the plugin lacks it: then a minimal distribution that declares only the entry point goes on the
    subprocess's path (never both, TensorBoard refuses two plugins of one name).
    """
    paths = [str(WORKTREE)]
    if not installed_entry_point():
        dist = tmp_path / "entry-point" / "actdiag_tb_test-0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: actdiag-tb-test\nVersion: 0\n")
        (dist / "entry_points.txt").write_text(f"[tensorboard_plugins]\nactdiag = {ENTRY_POINT}\n")
        paths.append(str(dist.parent))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


PYTHON = sys.executable
