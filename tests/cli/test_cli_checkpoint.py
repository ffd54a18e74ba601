"""--checkpoint: state dicts in the layouts that training code writes, loaded with weights_only=True."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch

from tests.cli.conftest import NET, read_json

SOURCE = NET + "\ndef example_input():\n    return torch.randn(4, 10)\n"


def _net_state(value: float) -> dict[str, torch.Tensor]:
    return {
        "fc1.weight": torch.full((20, 10), value),
        "fc1.bias": torch.zeros(20),
        "fc2.weight": torch.full((5, 20), value),
        "fc2.bias": torch.zeros(5),
    }


def _weight(doc, pname: str) -> dict:
    return next(p for p in doc["params"] if p["name"] == pname)["weight"]


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize(
    "layout",
    ["plain", "state_dict", "model", "model_state_dict", "ddp", "lightning", "ddp_in_lightning", "compiled"],
)
def test_checkpoint_layouts_are_loaded(write, run, tmp_path: Path, layout: str) -> None:
    state = _net_state(0.25)
    saved: object = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "model_state_dict": {"model_state_dict": state, "step": 10},
        "ddp": _prefixed(state, "module."),
        # Lightning: the LightningModule holds the network as self.model
        "lightning": {"state_dict": _prefixed(state, "model."), "epoch": 1, "global_step": 7},
        "ddp_in_lightning": {"state_dict": _prefixed(state, "model.module.")},
        "compiled": _prefixed(state, "_orig_mod."),
    }[layout]
    ckpt = tmp_path / "w.pt"
    torch.save(saved, ckpt)
    out = tmp_path / "r.json"
    result = run(write("model.py", SOURCE), "--checkpoint", ckpt, "--json", out)
    assert result.exit_code == 0, result.stderr
    doc = read_json(out)
    for pname in ("fc1.weight", "fc2.weight"):
        w = _weight(doc, pname)
        assert w["mean"] == pytest.approx(0.25) and w["std"] == pytest.approx(0.0, abs=1e-7)
    assert "not in" not in result.stderr and "ignored" not in result.stderr


def test_missing_and_unexpected_keys_are_reported(write, run, tmp_path) -> None:
    state = _net_state(0.5)
    del state["fc2.bias"]
    state["head.weight"] = torch.zeros(3)
    ckpt = tmp_path / "w.pt"
    torch.save(state, ckpt)
    out = tmp_path / "r.json"
    result = run(write("model.py", SOURCE), "--checkpoint", ckpt, "--json", out)
    assert result.exit_code == 0, result.stderr
    assert "1 of the model's tensors are not in" in result.stderr and "fc2.bias" in result.stderr
    assert "1 tensors in" in result.stderr and "head.weight" in result.stderr
    assert _weight(read_json(out), "fc1.weight")["mean"] == pytest.approx(0.5)


class _Marker:
    """An object whose unpickling would create a file: proof that the checkpoint is never unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (self.path,))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        ("arbitrary", "holds a pickled Python object ("),
        ("mismatch", "does not fit the model: size mismatch for fc1.weight"),
        ("nomatch", "none of the 2 tensors"),
        ("notensors", "has no tensors"),
        ("corrupt", "cannot read checkpoint"),
        ("missing", "does not exist"),
    ],
)
def test_bad_checkpoints_exit_2(write, run, tmp_path, make, expected) -> None:
    ckpt = tmp_path / "w.pt"
    marker = tmp_path / "unpickled"
    if make == "arbitrary":
        torch.save({"state_dict": _net_state(1.0), "extra": _Marker(marker)}, ckpt)
    elif make == "mismatch":
        torch.save(_net_state(1.0) | {"fc1.weight": torch.zeros(20, 3)}, ckpt)
    elif make == "nomatch":
        torch.save({"encoder.w": torch.zeros(2), "decoder.w": torch.zeros(2)}, ckpt)
    elif make == "notensors":
        torch.save({"epoch": 3, "lr": 0.1}, ckpt)
    elif make == "corrupt":
        ckpt.write_bytes(b"\x00not a checkpoint" * 10)
    out = tmp_path / "r.json"
    result = run(write("model.py", SOURCE), "--checkpoint", ckpt, "--json", out)
    assert result.exit_code == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
    assert not marker.exists()


def test_safetensors_checkpoint(write, run, tmp_path) -> None:
    st = pytest.importorskip("safetensors.torch")
    ckpt = tmp_path / "w.safetensors"
    st.save_file(_net_state(0.125), str(ckpt))
    out = tmp_path / "r.json"
    result = run(write("model.py", SOURCE), "--checkpoint", ckpt, "--json", out)
    assert result.exit_code == 0, result.stderr
    assert _weight(read_json(out), "fc2.weight")["mean"] == pytest.approx(0.125)
