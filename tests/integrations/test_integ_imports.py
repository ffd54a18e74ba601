"""actdiag imports without the frameworks; using an integration without its framework names the install command."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _block(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    # A None entry in sys.modules makes `import name` raise ImportError, as if the package were not installed.
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("module", "blocked", "hint"),
    [
        (
            "actdiag.integrations.lightning",
            ("lightning", "lightning.pytorch", "pytorch_lightning"),
            'pip install "actdiag[lightning]"',
        ),
        ("actdiag.integrations.transformers", ("transformers",), 'pip install "actdiag[transformers]"'),
    ],
)
def test_integ_missing_framework_gives_install_hint(
    monkeypatch: pytest.MonkeyPatch, module: str, blocked: tuple[str, ...], hint: str
) -> None:
    _block(monkeypatch, *blocked)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError) as info:
        importlib.import_module(module)
    assert hint in str(info.value)
    monkeypatch.delitem(sys.modules, module, raising=False)  # never leave the half-imported module behind


def test_integ_actdiag_works_without_frameworks() -> None:
    """A fresh interpreter where the frameworks cannot be imported: actdiag and its integrations package load, a
    watched step runs, and nothing imports a framework behind the user's back."""
    code = """
import sys
for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "transformers"):
    sys.modules[name] = None
import torch
import actdiag, actdiag.integrations
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
with actdiag.watch(model, every=1) as monitor:
    model(torch.randn(2, 3)).sum().backward()
    monitor.step()
assert monitor.recorded_steps == 1, monitor.recorded_steps
assert isinstance(monitor.findings, tuple)
loaded = [m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "transformers")]
assert all(sys.modules[m] is None for m in loaded), loaded
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
