"""The command itself: help and start-up, exit statuses, report files, internal errors, steps, the example."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import actdiag.monitor
import actdiag.rules
from actdiag import cli as cli_module
from actdiag.errors import ReportPathError
from actdiag.records import Finding, Fix, Report
from tests.cli.conftest import NET, read_json

ROOT = Path(__file__).resolve().parents[2]
SOURCE = NET + "\ndef example_input():\n    return torch.randn(4, 10)\n"


def _finding(severity: str = "warning") -> Finding:
    return Finding(
        code="vanishing_gradient",
        severity=severity,  # type: ignore[arg-type]
        layer="fc1",
        message="gradients at fc1 are 1e-6 times those at fc2",
        evidence={"ratio": 1e-6},
        fixes=(
            Fix(code="xavier_init", text="initialise fc1 with Xavier", snippet="nn.init.xavier_uniform_(m.fc1.weight)"),
        ),
    )


@pytest.fixture
def one_finding(monkeypatch):
    """Rules that report one hand-built finding of the given severity, which keeps its own hand-built fix."""

    def install(severity: str = "warning") -> None:
        monkeypatch.setattr(
            actdiag.rules,
            "diagnose",
            lambda layers, params=(), history=None, thresholds=None, **_: (_finding(severity),),
        )
        monkeypatch.setattr(actdiag.monitor, "attach_fixes", lambda findings, layers, **kw: tuple(findings))

    return install


def test_help_says_target_is_executed_as_python() -> None:
    result = CliRunner().invoke(cli_module.cli, ["inspect", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "executed as Python, like `python model.py`" in text
    for option in (
        "--json",
        "--html",
        "--logdir",
        "--steps",
        "--device",
        "--input-shape",
        "--input-dtype",
        "--input-range",
        "--checkpoint",
        "--seed",
        "--fail-on",
        "--try-fixes",
        "--debug",
    ):
        assert option in text


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "--help"]])
def test_help_and_version_do_not_import_torch(args) -> None:
    code = (
        "import sys\n"
        f"sys.argv = ['actdiag', *{args!r}]\n"
        "from actdiag.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TORCH False" in out.stdout


IMPORT_EACH_FIRST = """
import importlib, pkgutil, sys
import torch  # imported once; only actdiag's modules are forgotten between tries
import actdiag
# Not the framework adapters: importing Lightning or transformers takes seconds, and they reach actdiag through
# actdiag.integrations._common, which is checked.
heavy = ("actdiag.integrations.lightning", "actdiag.integrations.transformers")
names = sorted(m.name for m in pkgutil.walk_packages(actdiag.__path__, "actdiag.") if m.name not in heavy)
failed = []
for first in names + ["actdiag.watch", "actdiag.inspect", "actdiag.Finding"]:
    for name in [n for n in sys.modules if n == "actdiag" or n.startswith("actdiag.")]:
        del sys.modules[name]
    try:
        if first.split(".")[1][0].isupper() or first in ("actdiag.watch", "actdiag.inspect"):
            getattr(importlib.import_module("actdiag"), first.split(".")[1])
        else:
            importlib.import_module(first)
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("actdiag"):
            failed.append(f"{first}: {exc!r}")
    except Exception as exc:
        failed.append(f"{first}: {exc!r}")
print("CHECKED", len(names))
print("FAILED", failed)
"""


def test_every_module_imports_first_in_a_fresh_process() -> None:
    """With lazy public names, any module may be the first one imported (`import actdiag.monitor`, or
    `actdiag.watch` in a new process): none may depend on another having been imported before it."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_FIRST], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "FAILED []" in out.stdout, out.stdout
    assert int(out.stdout.split("CHECKED ")[1].split()[0]) > 10


def test_python_dash_m_actdiag_version() -> None:
    from actdiag import __version__

    out = subprocess.run(
        [sys.executable, "-m", "actdiag", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0
    assert out.stdout.strip() == f"actdiag, version {__version__}"


@pytest.mark.parametrize(
    ("severity", "fail_on", "status"),
    [
        ("warning", "never", 0),
        ("warning", "info", 1),
        ("warning", "warning", 1),
        ("warning", "error", 0),
        ("error", "error", 1),
        ("info", "warning", 0),
    ],
)
def test_fail_on_exit_status(write, run, one_finding, severity, fail_on, status) -> None:
    one_finding(severity)
    result = run(write("model.py", SOURCE), "--fail-on", fail_on)
    assert result.exit_code == status, result.stderr
    assert "vanishing_gradient" in result.stdout


def test_default_fail_on_is_never(write, run, one_finding) -> None:
    one_finding("error")
    assert run(write("model.py", SOURCE)).exit_code == 0


def test_summary_is_plain_when_piped(write, run, one_finding) -> None:
    one_finding("error")
    result = run(write("model.py", SOURCE))
    assert "\x1b[" not in result.stdout and "\x1b[" not in result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("verdict: 1 error in Net")
    assert "fc1 (Linear)" in result.stdout and "initialise fc1" in result.stdout
    assert "fix for vanishing_gradient at fc1 (xavier_init):" in result.stdout
    assert "nn.init.xavier_uniform_(m.fc1.weight)" in result.stdout
    quiet = run(write("model.py", SOURCE), "--quiet")
    assert quiet.stdout.strip().splitlines() == [lines[-1]]


def test_json_to_stdout(write, run, one_finding) -> None:
    one_finding("warning")
    result = run(write("model.py", "print('hello from the model file')\n" + SOURCE), "--json", "-")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)  # what the user's file prints does not end up in the JSON
    assert "hello from the model file" in result.stderr
    assert doc["schema"] == "actdiag.report/1"
    assert [f["code"] for f in doc["findings"]] == ["vanishing_gradient"]
    assert "verdict:" in result.stderr


def test_no_report_left_behind_when_the_target_fails(write, run, tmp_path) -> None:
    source = NET + "\ndef example_input():\n    return torch.randn(4, 3)\n"
    out, html = tmp_path / "r.json", tmp_path / "r.html"
    result = run(write("model.py", source), "--json", out, "--html", html)
    assert result.exit_code == 2
    assert not out.exists() and not html.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py"]


def test_a_failed_second_report_removes_the_first(write, run, tmp_path, monkeypatch) -> None:
    def refuse(self, path):
        raise ReportPathError(f"cannot write {str(path)!r}: disk full")

    monkeypatch.setattr(Report, "save_html", refuse)
    out = tmp_path / "r.json"
    result = run(write("model.py", SOURCE), "--json", out, "--html", tmp_path / "r.html")
    assert result.exit_code == 2
    assert "disk full" in result.stderr
    assert not out.exists()


def test_logdir_is_removed_when_the_target_fails(write, run, tmp_path) -> None:
    source = NET + "\ndef example_input():\n    return torch.randn(4, 3)\n"
    logdir = tmp_path / "runs" / "x"
    result = run(write("model.py", source), "--logdir", logdir)
    assert result.exit_code == 2
    assert not logdir.exists()


def test_html_report(write, run, tmp_path) -> None:
    html = tmp_path / "r.html"
    result = run(write("model.py", SOURCE), "--html", html)
    assert result.exit_code == 0, result.stderr
    assert "<html" in html.read_text().lower()


@pytest.mark.parametrize("option", ["--json", "--html"])
def test_unwritable_report_path_fails_before_running(write, run, tmp_path, option) -> None:
    ran = tmp_path / "ran"
    target = write("model.py", SOURCE.replace("def example_input", f"open({str(ran)!r}, 'w')\ndef example_input"))
    result = run(target, option, tmp_path)  # a directory
    assert result.exit_code == 2 and "is a directory" in result.stderr
    assert not ran.exists()


def test_bad_logdir_fails_before_running(write, run, tmp_path) -> None:
    ran = tmp_path / "ran"
    target = write("model.py", SOURCE.replace("def example_input", f"open({str(ran)!r}, 'w')\ndef example_input"))
    afile = tmp_path / "afile"
    afile.write_text("")
    result = run(target, "--logdir", afile)
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr
    result = run(target, "--logdir", afile / "sub")
    assert result.exit_code == 2 and "cannot be written" in result.stderr
    assert not ran.exists()


def test_internal_error_exits_3_and_asks_for_a_report(write, run, monkeypatch) -> None:
    def broken(layers, params=(), history=None, thresholds=None, **_):
        raise ZeroDivisionError("bug in a rule")

    monkeypatch.setattr(actdiag.rules, "diagnose", broken)
    result = run(write("model.py", SOURCE))
    assert result.exit_code == 3
    assert "internal error: ZeroDivisionError: bug in a rule" in result.stderr
    assert "bug in actdiag" in result.stderr and "--debug" in result.stderr
    assert "Traceback" not in result.stderr
    result = run(write("model.py", SOURCE), "--debug")
    assert result.exit_code == 3 and "Traceback" in result.stderr


def test_a_crash_while_printing_is_internal_and_removes_reports(write, run, tmp_path, monkeypatch) -> None:
    import actdiag.reports.console as console

    def broken(*args, **kwargs):
        raise KeyError("column")

    monkeypatch.setattr(console, "format_summary", broken)
    out = tmp_path / "r.json"
    result = run(write("model.py", SOURCE), "--json", out)
    assert result.exit_code == 3 and "internal error: KeyError" in result.stderr
    assert not out.exists()


def test_failure_inside_actdiag_hooks_is_internal_not_the_users(write, run, monkeypatch) -> None:
    """The recorder's hooks run inside the user's forward pass; their failure must not be blamed on the model."""
    import actdiag.hooks.recorder as recorder

    def broken(*args, **kwargs):
        raise RuntimeError("kernel bug")

    monkeypatch.setattr(recorder, "tensor_stats", broken)
    monkeypatch.setattr(recorder.HostBatch, "take", broken)  # tensors measured together, in end()
    result = run(write("model.py", SOURCE))
    assert result.exit_code == 3, result.stderr
    assert "kernel bug" in result.stderr


def test_sys_exit_in_forward_is_a_target_error(write, run) -> None:
    source = NET.replace("return self.fc2(", "raise SystemExit(5)\n        return self.fc2(")
    result = run(write("model.py", source + "\ndef example_input():\n    return torch.randn(4, 10)\n"))
    assert result.exit_code == 2
    assert "called sys.exit(5)" in result.stderr


def test_steps_with_an_optimizer(write, run, tmp_path) -> None:
    out = tmp_path / "r.json"
    result = run(write("model.py", SOURCE), "--steps", "3", "--optimizer", "sgd", "--lr", "0.1", "--json", out)
    assert result.exit_code == 0, result.stderr
    doc = read_json(out)
    assert doc["run"]["steps"] == 3
    assert doc["history"]["steps"] == [0, 1, 2]
    ratios = [p["update_ratio"] for p in doc["params"] if p["name"].endswith("weight")]
    assert ratios and all(r is not None and r > 0 for r in ratios)


def test_seed_makes_runs_repeatable(write, run, tmp_path) -> None:
    target = write("model.py", SOURCE)
    docs = []
    for seed in ("1", "1", "2"):
        out = tmp_path / f"r{len(docs)}.json"
        assert run(target, "--seed", seed, "--json", out).exit_code == 0
        docs.append(read_json(out)["layers"][0]["activation"]["mean"])
    assert docs[0] == docs[1] != docs[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_device_cuda_without_cuda(write, run) -> None:
    result = run(write("model.py", SOURCE), "--device", "cuda")
    assert result.exit_code == 2 and "CUDA is not available" in result.stderr


@pytest.mark.gpu
def test_device_cuda(write, run, tmp_path) -> None:
    out = tmp_path / "r.json"
    result = run(write("model.py", SOURCE), "--device", "cuda", "--json", out)
    assert result.exit_code == 0, result.stderr
    assert read_json(out)["run"]["device"].startswith("cuda")


def test_readme_example_runs(run, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ACTDIAG_EXAMPLE_SMALL", "1")
    out = tmp_path / "r.json"
    result = run(ROOT / "examples" / "tanh_mlp.py", "--json", out)
    assert result.exit_code == 0, result.stderr
    doc = read_json(out)
    assert doc["layers"][0]["type"] == "Linear"
    # The example's own __main__ block runs too (as `python examples/tanh_mlp.py`).
    runpy.run_path(str(ROOT / "examples" / "tanh_mlp.py"), run_name="__main__")
    printed = capsys.readouterr().out
    codes = {f["code"] for f in doc["findings"]}
    assert codes & {"vanishing_gradient", "activation_collapse"}
    assert any(fix["code"] == "xavier_init" for f in doc["findings"] for fix in f["fixes"])
    assert "xavier_init" in printed


def test_every_dtype_name_is_known_to_the_loader() -> None:
    from actdiag.inputs import DTYPES

    assert set(cli_module.INPUT_DTYPES) == set(DTYPES)


def test_environment_is_untouched_by_a_failed_run(write, run) -> None:
    path_before = list(sys.path)
    run(write("model.py", "import sys\nsys.path.append('x')\nraise ValueError('no')\n"))
    assert sys.path == path_before
