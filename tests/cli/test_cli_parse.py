"""How a TARGET string is read (actdiag.loading.parse_target)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actdiag.errors import TargetError
from actdiag.loading import parse_target


@pytest.mark.parametrize(
    ("text", "path", "module", "attr"),
    [
        ("model.py", "model.py", None, None),
        ("nets/model.py:Net", "nets/model.py", None, "Net"),
        ("model.py:Outer.inner", "model.py", None, "Outer.inner"),
        ("pkg.models:build", None, "pkg.models", "build"),
        ("pkg.models", None, "pkg.models", None),
        (r"C:\models\net.py", r"C:\models\net.py", None, None),  # a Windows drive is not ":NAME"
        ("/tmp/a:b/model.py", "/tmp/a:b/model.py", None, None),
        ("my-model", "my-model", None, None),  # not an importable name: a (missing) file
    ],
)
def test_parse_target(text, path, module, attr) -> None:
    spec = parse_target(text)
    assert (spec.path, spec.module, spec.attr) == (Path(path) if path else None, module, attr)


def test_a_folder_without_init_is_a_directory_not_a_package(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert parse_target("models").path == Path("models")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    assert parse_target("pkg").module == "pkg"


def test_empty_target() -> None:
    with pytest.raises(TargetError, match="TARGET is empty"):
        parse_target("  ")
