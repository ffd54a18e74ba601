from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from actdiag.cli import cli

# A small model every test can reuse: two Linear layers with a tanh between them.
NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 20)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """write("model.py", source) -> the path of a dedented file under tmp_path."""

    def _write(name: str, source: str, folder: Path | None = None) -> Path:
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
        return path

    return _write


@pytest.fixture
def run() -> Callable[..., Result]:
    """run(*args) -> click Result of `actdiag inspect *args` (stdout and stderr kept apart)."""

    def _run(*args: Any, env: dict[str, str] | None = None) -> Result:
        result = CliRunner().invoke(cli, ["inspect", *map(str, args)], env=env)
        # Exit through SystemExit only: anything else escaping the command is a bug in the command itself.
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    return _run


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def layer(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(item for item in doc["layers"] if item["name"] == name)
