from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from actdiag.errors import ReportPathError
from actdiag.reports._atomic import atomic_write


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "r.json"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    assert target.read_text() == "two"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


def test_atomic_write_names_the_unwritable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReportPathError, match="file/r.json"):
        atomic_write(blocker / "r.json", "data")
