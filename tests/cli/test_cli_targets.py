"""TARGET forms, model discovery and every way loading the user's file can fail (exit 2, one clear message)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from tests.cli.conftest import NET, layer, read_json

INPUT = "\ndef example_input():\n    return torch.randn(4, 10)\n"


def test_file_target_with_build_model_runs_and_writes_json(write, run, tmp_path: Path) -> None:
    target = write("model.py", NET + INPUT + "\ndef build_model():\n    return Net()\n")
    out = tmp_path / "r.json"
    result = run(target, "--json", out)
    assert result.exit_code == 0, result.stderr
    doc = read_json(out)
    assert doc["model"]["name"] == "Net"
    assert [item["name"] for item in doc["layers"]] == ["fc1", "act", "fc2"]
    assert layer(doc, "fc1")["activation"]["count"] == 4 * 20
    assert result.stdout.splitlines()[0].startswith(f"actdiag: Net from {target}: build_model() (325 parameters")
    assert "verdict:" in result.stdout
    assert result.stderr.strip().endswith(f"wrote {out}")


def test_inspect_target_from_python(write) -> None:
    """The library entry the command uses: no click, no exit, a Report back (and TargetError on bad files)."""
    from actdiag.errors import TargetError
    from actdiag.loading import open_target, run_inspect

    target = write("model.py", NET + INPUT)
    with open_target(str(target)) as loaded:
        report = run_inspect(loaded, steps=2)
    assert loaded.found_as == "Net()" and report.run.steps == 2
    assert [layer.name for layer in report.layers] == ["fc1", "act", "fc2"]
    with pytest.raises(TargetError, match="does not exist"), open_target(str(target) + "x"):
        pass


@pytest.mark.parametrize(
    ("suffix", "name"),
    [("", "Small"), ("\nsmall = Small()\n", "small"), ("\ndef make():\n    return Small()\n", "make")],
)
def test_file_colon_name_picks_a_class_an_instance_or_a_function(write, run, tmp_path, suffix, name) -> None:
    source = NET + INPUT + "\nclass Small(Net):\n    pass\n" + suffix
    target = write("model.py", source)
    out = tmp_path / "r.json"
    result = run(f"{target}:{name}", "--json", out)
    assert result.exit_code == 0, result.stderr
    assert read_json(out)["model"]["name"] == "Small"


def test_package_module_colon_name(write, run, tmp_path, monkeypatch) -> None:
    pkg = f"actdiag_testpkg_{uuid.uuid4().hex[:8]}"
    write("__init__.py", "", folder=tmp_path / pkg)
    write("nets.py", NET + INPUT, folder=tmp_path / pkg)
    monkeypatch.chdir(tmp_path)  # like `python -m`, the current folder is where packages are found
    out = tmp_path / "r.json"
    result = run(f"{pkg}.nets:Net", "--json", out)
    assert result.exit_code == 0, result.stderr
    assert read_json(out)["model"]["name"] == "Net"
    result = run(f"{pkg}.missing_module:Net")
    assert result.exit_code == 2
    assert f"no module named '{pkg}.missing_module'" in result.stderr


def _params(run, target, tmp_path) -> int:
    out = tmp_path / "r.json"
    result = run(target, "--json", out)
    assert result.exit_code == 0, result.stderr
    return read_json(out)["model"]["parameters"]


def test_discovery_order(write, run, tmp_path) -> None:
    # Net has 10*20+20 + 20*5+5 = 325 parameters; the factories and the instance are told apart by size.
    base = NET + INPUT + "\nclass Other(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    base += "        self.fc = nn.Linear(10, 5)\n    def forward(self, x):\n        return self.fc(x)\n"
    factories = "\ndef create_model():\n    return nn.Linear(10, 1)\n"
    factories += "\ndef get_model():\n    return nn.Linear(10, 2)\n"
    factories += "\ndef build_model():\n    return nn.Linear(10, 3)\n"
    assert _params(run, write("a.py", base + "\nmodel = nn.Linear(10, 4)\n" + factories), tmp_path) == 33
    assert (
        _params(run, write("b.py", base + "\nmodel = nn.Linear(10, 4)\n" + factories.split("\ndef build")[0]), tmp_path)
        == 22
    )
    assert _params(run, write("c.py", base + "\nmodel = nn.Linear(10, 4)\n"), tmp_path) == 44
    assert _params(run, write("d.py", base + "\nnet = Net()\n"), tmp_path) == 325  # the only instance wins
    assert _params(run, write("e.py", NET + INPUT), tmp_path) == 325  # the only class that needs no arguments
    # a loss module at module level is not a candidate model
    assert _params(run, write("f.py", NET + INPUT + "\nnet = Net()\ncriterion = nn.MSELoss()\n"), tmp_path) == 325


def test_ambiguous_models_are_listed(write, run) -> None:
    target = write("two.py", NET + INPUT + "\nclass Net2(Net):\n    pass\n")
    result = run(target)
    assert result.exit_code == 2
    assert "several models" in result.stderr
    assert "Net, Net2" in result.stderr
    assert f"{target}:Net2" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_model_lists_what_was_found(write, run) -> None:
    source = """
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim, depth):
            super().__init__()

    def helper(x):
        return x
    """
    result = run(write("none.py", source))
    assert result.exit_code == 2
    assert "no model found" in result.stderr
    assert "class Block(dim, depth)" in result.stderr and "function helper()" in result.stderr


def test_missing_name_lists_the_candidates(write, run) -> None:
    target = write("model.py", NET + INPUT)
    result = run(f"{target}:Nett")
    assert result.exit_code == 2
    assert "has no 'Nett'" in result.stderr and "Net" in result.stderr


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        ("syntax.py", "import torch\n\ndef build_model(:\n    pass\n", ["syntax error in", "syntax.py line 3"]),
        ("imports.py", "import torch\nimport no_such_pkg_actdiag\n", ["'no_such_pkg_actdiag'", "imports.py line 2"]),
        (
            "raises.py",
            "def build_model():\n    raise RuntimeError('weights file not found')\n",
            ["build_model() raised RuntimeError: weights file not found", "raises.py line 2"],
        ),
        (
            "notmodule.py",
            "def build_model():\n    return {'a': 1}\n",
            ["build_model() returned a dict, not a torch.nn.Module"],
        ),
        (
            "exits.py",
            "import sys\nsys.exit(3)\n",
            ["called sys.exit(3) while being imported", '__name__ == "__main__"'],
        ),
        (
            "needs.py",
            "def build_model(width):\n    pass\n",
            ["build_model() needs arguments (width); give them default"],
        ),
        ("toplevel.py", "x = 1 / 0\n", ["importing", "ZeroDivisionError: division by zero", "toplevel.py line 1"]),
        ("weird.py", "model = 3\n", ["no model found"]),
    ],
)
def test_bad_files_exit_2_with_one_clear_message(write, run, tmp_path, name, source, expected) -> None:
    out = tmp_path / "r.json"
    result = run(write(name, source), "--json", out)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actdiag: error: ")
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_debug_shows_the_traceback(write, run) -> None:
    result = run(write("raises.py", "def build_model():\n    raise RuntimeError('boom')\n"), "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "RuntimeError: boom" in result.stderr


def test_missing_file_and_directory(run, tmp_path) -> None:
    result = run(tmp_path / "nope.py")
    assert result.exit_code == 2 and "nope.py does not exist" in result.stderr
    (tmp_path / "m.py").write_text(NET)
    result = run(tmp_path)
    assert result.exit_code == 2 and "is a directory" in result.stderr and "m.py" in result.stderr
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    result = run(ckpt)
    assert result.exit_code == 2 and "--checkpoint" in result.stderr


def test_imported_like_python_model_py(write, run, tmp_path) -> None:
    """Sibling imports work, dataclasses with postponed annotations work, the __main__ block does not run,
    sys.argv is the file, and sys.path / sys.modules are restored afterwards."""
    folder = tmp_path / "proj"
    sibling = f"sibling_{uuid.uuid4().hex[:8]}"
    write(f"{sibling}.py", "WIDTH = 7\n", folder=folder)
    source = f"""
    from __future__ import annotations

    import sys
    from dataclasses import dataclass

    import torch
    from torch import nn

    from {sibling} import WIDTH

    assert __name__ != "__main__"
    assert sys.argv[0].endswith("model.py"), sys.argv

    @dataclass
    class Config:
        width: int = WIDTH
        act: nn.Module | None = None

    def build_model():
        return nn.Linear(3, Config().width)

    def example_input():
        return torch.randn(2, 3)

    sys.argv = ["replaced"]  # replacing the lists, not only editing them, is undone too
    sys.path = list(sys.path) + ["elsewhere"]

    if __name__ == "__main__":
        raise SystemExit("the __main__ block ran")
    """
    target = write("model.py", source, folder=folder)
    path_before, argv_before = list(sys.path), list(sys.argv)
    path_obj, argv_obj = sys.path, sys.argv
    out = tmp_path / "r.json"
    result = run(target, "--json", out)
    assert result.exit_code == 0, result.stderr
    assert read_json(out)["model"]["parameters"] == 3 * 7 + 7
    assert sys.path == path_before and sys.argv == argv_before
    assert sys.path is path_obj and sys.argv is argv_obj
    assert sibling not in sys.modules
    assert not any(name.startswith("_actdiag_target_") for name in sys.modules)
