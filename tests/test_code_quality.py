"""The house rules that tools can check: ruff lint and format, mypy on the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY_DIRS = ["actdiag", "tests", "examples", "bench", "docs"]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_lint_and_format() -> None:
    dirs = [d for d in PY_DIRS if (ROOT / d).is_dir()]
    lint = run("ruff", "check", *dirs)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    files = [str(p.relative_to(ROOT)) for d in dirs for p in (ROOT / d).rglob("*.py")]
    fmt = run("ruff", "format", "--check", *files)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_clean_on_the_package() -> None:
    pytest.importorskip("mypy")
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr
