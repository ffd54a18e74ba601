"""Every example runs, small, as `python examples/<name>.py` would run it (through runpy), and does what it says."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import pytest

from tests.integrations._tb import actdiag_tags

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(name: str, *argv: str) -> Any:
    """Execute the example file (not as __main__, so nothing runs on import) and call its main() with `argv`."""
    namespace = runpy.run_path(str(EXAMPLES / name), run_name="actdiag_example")
    return namespace["main"](list(argv))


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_integ_example_plain_loop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monitor = _run(
        "plain_loop.py",
        *("--steps", "6", "--every", "2", "--logdir", str(tmp_path / "tb")),
        *("--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")),
    )
    assert monitor.steps == 6 and monitor.recorded_steps == 3
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["schema"] == "actdiag.report/1"
    assert [layer["name"] for layer in doc["layers"]][:2] == ["0", "1"]
    assert "activations/1" in actdiag_tags(tmp_path / "tb")
    assert _is_png(tmp_path / "p.png")
    out = capsys.readouterr().out
    assert "recorded 3 of 6 steps" in out and "findings:" in out


def test_integ_example_plain_loop_small_init_shrinks_signal(tmp_path: Path) -> None:
    """The example's claim: with N(0, 0.01^2) weights each tanh layer's output is ~10x smaller than the last."""
    monitor = _run("plain_loop.py", "--steps", "1", "--init", "small")
    stds = [layer.activation.std for layer in monitor.report().layers if layer.type == "Tanh"]
    assert all(b < a / 3 for a, b in zip(stds[:4], stds[1:4]))


def _wide(monitor: Any) -> Any:
    return next(layer for layer in monitor.report().layers if layer.name == "wide")


def test_integ_example_mixed_precision(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from actdiag.records import FP16_MAX

    monitor = _run("mixed_precision.py", "--steps", "2", "--every", "1", "--plot", str(tmp_path / "mp.png"))
    wide = _wide(monitor)
    assert wide.dtype == "float16"
    # What the example promises: activations within one doubling of float16's maximum, not past it ...
    assert FP16_MAX / 2 < wide.activation.abs_max <= FP16_MAX
    assert wide.activation.nonfinite_count == 0
    # ... and gradients in float16's subnormal range (below 2**-14), seen through the exponent histogram.
    assert wide.gradient.exponents.fraction_below(-13) > 0.9
    assert _is_png(tmp_path / "mp.png")
    assert "wide" in capsys.readouterr().out
    # The precision rules read exactly these histograms; the example exists to show their two findings.
    assert {"fp16_overflow", "fp16_underflow"} <= {f.code for f in monitor.findings}


def test_integ_example_mixed_precision_fixes() -> None:
    scaled = _wide(_run("mixed_precision.py", "--steps", "2", "--every", "1", "--loss-scaling"))
    assert scaled.gradient.exponents.fraction_below(-13) < 0.1  # loss scaling lifts gradients into the normal range
    bf16 = _wide(_run("mixed_precision.py", "--steps", "2", "--every", "1", "--dtype", "bfloat16"))
    assert bf16.dtype == "bfloat16" and bf16.activation.nonfinite_count == 0


def test_integ_example_mixed_precision_overflow_is_nonfinite() -> None:
    wide = _wide(_run("mixed_precision.py", "--steps", "1", "--every", "1", "--scale", "2e5"))
    assert wide.dtype == "float16"
    assert wide.activation.nonfinite_count > 0


def test_integ_example_lightning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("lightning.pytorch", reason="lightning is not installed")
    callback = _run(
        "lightning_example.py",
        "--steps",
        "4",
        "--every",
        "2",
        "--out",
        str(tmp_path),
        "--plot",
        str(tmp_path / "l.png"),
    )
    assert callback.monitor.steps == 4 and callback.monitor.recorded_steps == 2
    assert callback.logdir.resolve() == (tmp_path / "small_cnn" / "version_0").resolve()
    assert "activations/net.0" in actdiag_tags(callback.logdir)
    assert _is_png(tmp_path / "l.png")
    assert "callback.findings" in capsys.readouterr().out


def test_integ_example_hf_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers", reason="transformers is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    callback = _run(
        "hf_trainer.py", "--steps", "2", "--every", "2", "--out", str(tmp_path), "--plot", str(tmp_path / "h.png")
    )
    assert callback.monitor.steps == 2 and callback.monitor.recorded_steps == 1
    assert callback.logdir.parent.resolve() == (tmp_path / "runs").resolve()
    assert "activations/lm_head" in actdiag_tags(callback.logdir)
    assert _is_png(tmp_path / "h.png")
