"""The second wave of the command line: `report`, `diff`, `inspect --layers`, `--threshold` and pyproject.toml,
targets for the loss (`example_target()`), and bad saved reports (one line, exit 2)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from actdiag.cli import cli
from actdiag.rules.thresholds import threshold_names
from tests.cli.conftest import layer, read_json

# One model class, `Net`, whose second ReLU layer can be killed by a bias of BIAS: two runs of the same model
# with and without a dead layer.
NET = """
import torch
from torch import nn

BIAS = {bias}

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(32, 4)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
        nn.init.kaiming_normal_(self.fc2.weight, nonlinearity="relu")
        with torch.no_grad():
            self.fc2.bias.fill_(BIAS)

    def forward(self, x):
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))

def example_input():
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
"""

# A tanh MLP that saturates: about a third of its outputs sit at +-1 (tests/zoo.py SaturatedTanhNet's weights).
SATURATED = """
import math
import torch
from torch import nn

def build_model():
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        lin = nn.Linear(64, 64)
        nn.init.normal_(lin.weight, std=3.2 / math.sqrt(64))
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 4))

def example_input():
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
"""

OTHER = """
import torch
from torch import nn

class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(x)

def example_input():
    return torch.randn(8, 16)
"""


def invoke(*args: Any) -> Result:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def one_line(result: Result) -> str:
    """The single error line on standard error (and nothing else there)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("actdiag: error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def runs(tmp_path: Path, write: Callable[..., Path]) -> dict[str, Path]:
    """JSON reports of a healthy Net and of the same Net with act2 dead, and of a different model."""
    out = {}
    for name, source in (
        ("healthy", NET.format(bias=0.0)),
        ("dead", NET.format(bias=-10.0)),
        ("other", OTHER),
    ):
        model = write(f"{name}/model.py", source)
        path = tmp_path / f"{name}.json"
        result = invoke("inspect", model, "--json", path, "-q")
        assert result.exit_code == 0, result.output
        out[name] = path
    return out


# ------------------------------------------------------------------------------------------------ report
def test_report_rerenders_a_saved_run(runs: dict[str, Path], tmp_path: Path) -> None:
    html = tmp_path / "out" / "dead.html"
    result = invoke("report", runs["dead"], "--html", html)
    assert result.exit_code == 0, result.output
    assert "dead_relu" in result.stdout and "act2" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("verdict: 1 error")
    page = html.read_text()
    assert page.lstrip().lower().startswith("<!doctype html")
    assert "dead_relu" in page and "act2" in page
    assert f"wrote {html}" in result.stderr


def test_report_html_matches_the_html_of_the_run(runs: dict[str, Path], tmp_path: Path, write: Any) -> None:
    """The HTML from a saved run carries the run's findings and layers, as the direct HTML does."""
    model = write("again/model.py", NET.format(bias=-10.0))
    direct, saved = tmp_path / "direct.html", tmp_path / "saved.html"
    assert invoke("inspect", model, "--html", direct, "-q").exit_code == 0
    assert invoke("report", runs["dead"], "--html", saved, "-q").exit_code == 0
    for text in ("fc1", "act1", "fc2", "act2", "head", "dead_relu"):
        assert text in direct.read_text() and text in saved.read_text()


BAD_FILES: dict[str, tuple[bytes | None, str]] = {
    "not_json": (b"this is not json\n", "it is not JSON"),
    "not_actdiag": (b'{"layers": [], "findings": []}', "it is not an actdiag report"),
    "foreign_schema": (b'{"schema": "someone.else/1"}', "it is not an actdiag report"),
    "newer_schema": (b'{"schema": "actdiag.report/2", "layers": []}', "schema 'actdiag.report/2'"),
    "damaged": (b'{"schema": "actdiag.report/1", "model": {"name": "N", "parameters": 1}}', "damaged"),
    "binary": (b"\xff\xfe\x00\x01garbage", "not UTF-8"),
    "a_list": (b"[1, 2, 3]", "it is not an actdiag report"),
    "missing": (None, "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_report_bad_input_is_one_line_exit_2(case: str, tmp_path: Path) -> None:
    content, expected = BAD_FILES[case]
    path = tmp_path / f"{case}.json"
    if content is not None:
        path.write_bytes(content)
    html = tmp_path / "never.html"
    result = invoke("report", path, "--html", html)
    assert result.exit_code == 2
    line = one_line(result)
    assert expected in line and str(path) in line
    assert not html.exists()
    assert result.stdout == ""


def test_report_of_a_directory_or_unreadable_file(tmp_path: Path) -> None:
    result = invoke("report", tmp_path)
    assert result.exit_code == 2
    assert "is a directory" in one_line(result)


def test_diff_rejects_bad_input_either_side(runs: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "actdiag.report/9"}')
    for args in ((bad, runs["healthy"]), (runs["healthy"], bad)):
        result = invoke("diff", *args)
        assert result.exit_code == 2
        assert "actdiag.report/9" in one_line(result)


# ------------------------------------------------------------------------------------------------ diff
def test_diff_of_a_run_with_itself_changes_nothing(runs: dict[str, Path]) -> None:
    result = invoke("diff", runs["dead"], runs["dead"], "--fail-on", "info")
    assert result.exit_code == 0, result.output
    assert "no finding appeared or went away" in result.stdout
    assert "0 of 5 layers changed notably" in result.stdout
    assert "remained (1)" in result.stdout


def test_diff_reports_what_appeared_and_exits_1(runs: dict[str, Path]) -> None:
    result = invoke("diff", runs["healthy"], runs["dead"], "--fail-on", "warning")
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "appeared in" in out and "dead_relu" in out
    verdict = out.rstrip().splitlines()[-1]
    assert verdict.startswith("diff: findings 1 appeared (1 error)")
    # The per-layer table: act2 goes from partly alive to 100% dead, marked as a notable change.
    row = next(line for line in out.splitlines() if re.match(r"\*\s+act2\s", line))
    before = layer(read_json(runs["healthy"]), "act2")["dead_fraction"]
    assert f"{before:.0%} -> 100%" in row
    # Without --fail-on, the same diff exits 0 (as inspect does by default).
    assert invoke("diff", runs["healthy"], runs["dead"]).exit_code == 0


def test_diff_reports_what_went_away_and_exits_0(runs: dict[str, Path]) -> None:
    result = invoke("diff", runs["dead"], runs["healthy"], "--fail-on", "info")
    assert result.exit_code == 0, result.output
    assert "went away (1)" in result.stdout
    assert re.search(r"error\s+dead_relu at act2", result.stdout)
    assert "findings 1 went away" in result.stdout.rstrip().splitlines()[-1]


def test_diff_table_numbers_come_from_the_files(runs: dict[str, Path]) -> None:
    """The act std and grad rms shown for fc1 are the files' numbers (grad rms from the gradient's std and mean)."""
    result = invoke("diff", runs["healthy"], runs["dead"])
    from actdiag.reports.console import format_number

    b, a = layer(read_json(runs["healthy"]), "fc1"), layer(read_json(runs["dead"]), "fc1")
    row = next(line for line in result.stdout.splitlines() if re.match(r"\*?\s+fc1\s", line))
    assert f"{format_number(b['activation']['std'])} -> {format_number(a['activation']['std'])}" in row
    rms = [float(np.hypot(d["gradient"]["std"], d["gradient"]["mean"])) for d in (b, a)]
    assert f"{format_number(rms[0])} -> {format_number(rms[1])}" in row


def test_diff_of_different_models_names_what_differs(runs: dict[str, Path]) -> None:
    result = invoke("diff", runs["healthy"], runs["other"])
    assert result.exit_code == 2
    line = one_line(result)
    assert "different models" in line
    assert "Net" in line and "Other" in line
    assert str(runs["healthy"]) in line and str(runs["other"]) in line


def test_diff_of_a_layer_that_changed_type_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    doc = read_json(runs["healthy"])
    for item in doc["layers"]:
        if item["name"] == "act2":
            item["type"] = "Tanh"
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(doc))
    result = invoke("diff", runs["healthy"], changed)
    assert result.exit_code == 2
    assert "layer 'act2' is ReLU" in one_line(result) and "Tanh" in one_line(result)


def test_diff_lists_layers_only_one_run_has(runs: dict[str, Path], tmp_path: Path) -> None:
    doc = read_json(runs["healthy"])
    doc["layers"] = [item for item in doc["layers"] if item["name"] != "act1"]
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(doc))
    result = invoke("diff", runs["healthy"], fewer)
    assert result.exit_code == 0, result.output
    assert f"layers only in {runs['healthy']}: act1" in result.stdout


# ------------------------------------------------------------------------------------------------ --layers
def test_inspect_layers_prints_the_depth_profile(write: Callable[..., Path], tmp_path: Path) -> None:
    model = write("model.py", NET.format(bias=-10.0))
    path = tmp_path / "r.json"
    result = invoke("inspect", model, "--layers", "--json", path)
    assert result.exit_code == 0, result.output
    doc = read_json(path)
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("depth profile"))
    rows = lines[start + 3 : start + 3 + len(doc["layers"])]
    from actdiag.reports.console import format_number

    for i, (row, item) in enumerate(zip(rows, doc["layers"], strict=True)):
        cells = row.split()
        assert cells[:3] == [str(i), item["name"], item["type"]]
        assert format_number(item["activation"]["std"]) in row
    # act2 is 100% dead: its activation std is 0 (no bar) and its dead share reads 100%.
    act2 = rows[3]
    assert "100%" in act2
    assert layer(doc, "act2")["activation"]["std"] == 0
    # Bars: full for the largest activation std, each other one as long as its log distance from it says.
    from actdiag.reports.console import BAR_WIDTH, log_bar

    top = max(item["activation"]["std"] for item in doc["layers"])
    for row, item in zip(rows, doc["layers"], strict=True):
        bar = log_bar(item["activation"]["std"], top)
        assert (bar in row) if bar else "\u2588" not in row.split(item["type"], 1)[1].split()[1:2]
    assert sum("\u2588" * BAR_WIDTH in row for row in rows) >= 1
    # Without --layers there is no profile.
    assert "depth profile" not in invoke("inspect", model).stdout


def test_log_bar_lengths() -> None:
    from actdiag.reports.console import BAR_DECADES, BAR_WIDTH, log_bar

    assert log_bar(1.0, 1.0) == "\u2588" * BAR_WIDTH
    assert log_bar(1.0, 1.0, unicode=False) == "#" * BAR_WIDTH
    per_decade = BAR_WIDTH // BAR_DECADES
    assert log_bar(0.1, 1.0, unicode=False) == "#" * (BAR_WIDTH - per_decade)
    assert log_bar(1e-3, 1.0, unicode=False) == "#" * (BAR_WIDTH - 3 * per_decade)
    assert log_bar(1e-30, 1.0) == "\u258f"  # tiny is drawn, thinly; zero is not
    assert log_bar(0.0, 1.0) == "" and log_bar(None, 1.0) == "" and log_bar(float("nan"), 1.0) == ""


# ------------------------------------------------------------------------------------------------ thresholds
def _finding_codes(path: Path) -> set[str]:
    return {f["code"] for f in read_json(path)["findings"]}


def test_threshold_option_changes_the_diagnosis(write: Callable[..., Path], tmp_path: Path) -> None:
    model = write("sat/model.py", SATURATED)
    out = tmp_path / "default.json"
    assert invoke("inspect", model, "--json", out, "-q").exit_code == 0
    assert "saturation" in _finding_codes(out)
    share = max(item.get("saturation", 0.0) for item in read_json(out)["layers"])
    # Raised just above the worst layer's share the finding goes away; at exactly that share it stays (at_least).
    for value, fires in ((share + 1e-6, False), (share, True)):
        path = tmp_path / f"{value}.json"
        option = f"saturation_fraction_at_least={value!r}"
        result = invoke("inspect", model, "--json", path, "-q", "--threshold", option)
        assert result.exit_code == 0, result.output
        assert ("saturation" in _finding_codes(path)) is fires


def test_threshold_makes_a_finding_appear(write: Callable[..., Path], tmp_path: Path) -> None:
    # A bias of -1 silences a fifth of act2's units: under the default 50%, so no finding.
    model = write("healthy/model.py", NET.format(bias=-1.0))
    base = tmp_path / "base.json"
    assert invoke("inspect", model, "--json", base, "-q").exit_code == 0
    assert "dead_relu" not in _finding_codes(base)
    dead = max(item.get("dead_fraction", 0.0) for item in read_json(base)["layers"])
    assert 0.1 < dead < 0.5
    low = tmp_path / "low.json"
    result = invoke("inspect", model, "--json", low, "-q", "--threshold", f"dead_fraction_above={dead / 2}")
    assert result.exit_code == 0, result.output
    assert "dead_relu" in _finding_codes(low)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("saturation_fraction=0.3", "unknown threshold saturation_fraction"),
        ("saturation_fraction_at_least=lots", "is not a number"),
        ("dead_min_samples=2.5", "is not an integer"),
        ("saturation_fraction_at_least", "is not NAME=VALUE"),
        ("saturation_fraction_at_least=nan", "is not a number"),
    ],
)
def test_bad_threshold_option_is_one_line_exit_2(
    option: str, expected: str, write: Callable[..., Path], tmp_path: Path
) -> None:
    model = write("model.py", NET.format(bias=0.0))
    out = tmp_path / "r.json"
    result = invoke("inspect", model, "--threshold", option, "--json", out)
    assert result.exit_code == 2
    line = one_line(result)
    assert expected in line
    if "unknown" in expected:
        assert all(name in line for name in threshold_names())
    assert not out.exists()


PYPROJECT = """
[project]
name = "mine"

[tool.actdiag.thresholds]
{body}
"""


def test_pyproject_thresholds_next_to_the_model(write: Callable[..., Path], tmp_path: Path) -> None:
    model = write("proj/src/model.py", NET.format(bias=-1.0))
    base = tmp_path / "base.json"
    assert invoke("inspect", model, "--json", base, "-q").exit_code == 0
    dead = max(item.get("dead_fraction", 0.0) for item in read_json(base)["layers"])
    write("proj/pyproject.toml", PYPROJECT.format(body=f"dead_fraction_above = {dead / 2}"))
    out = tmp_path / "proj.json"
    result = invoke("inspect", model, "--json", out)
    assert result.exit_code == 0, result.output
    assert "dead_relu" in _finding_codes(out)
    assert f"thresholds from {tmp_path / 'proj' / 'pyproject.toml'}" in result.stderr
    # --threshold wins over the file.
    back = tmp_path / "back.json"
    assert invoke("inspect", model, "--json", back, "-q", "--threshold", "dead_fraction_above=0.5").exit_code == 0
    assert "dead_relu" not in _finding_codes(back)


def test_nearest_pyproject_wins_even_without_the_table(write: Callable[..., Path], tmp_path: Path) -> None:
    write("outer/pyproject.toml", PYPROJECT.format(body="dead_fraction_above = 0.0"))
    write("outer/inner/pyproject.toml", '[project]\nname = "inner"\n')
    model = write("outer/inner/model.py", NET.format(bias=-1.0))
    out = tmp_path / "r.json"
    result = invoke("inspect", model, "--json", out)
    assert result.exit_code == 0, result.output
    assert "dead_relu" not in _finding_codes(out)
    assert "thresholds from" not in result.stderr


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("nonsense = 1", "unknown threshold nonsense"),
        ('dead_fraction_above = "half"', "is not a number"),
        ("dead_fraction_above = [1", "is not valid TOML"),
    ],
)
def test_bad_pyproject_is_one_line_exit_2(body: str, expected: str, write: Callable[..., Path]) -> None:
    write("p/pyproject.toml", PYPROJECT.format(body=body))
    model = write("p/model.py", NET.format(bias=0.0))
    result = invoke("inspect", model)
    assert result.exit_code == 2
    line = one_line(result)
    assert expected in line and "pyproject.toml" in line


# ------------------------------------------------------------------------------------------------ targets
TARGET_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x)

def example_input():
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(2))

def example_target():
    return torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

{loss}
"""


def test_example_target_reaches_loss_fn(write: Callable[..., Path], tmp_path: Path) -> None:
    """The gradient at the output is that of cross-entropy with these labels: (softmax - onehot) / N, checked
    against numpy."""
    loss = "def loss_fn(output, inputs, target):\n    return nn.functional.cross_entropy(output, target)\n"
    model = write("model.py", TARGET_NET.format(loss=loss))
    out = tmp_path / "r.json"
    result = invoke("inspect", model, "--json", out)
    assert result.exit_code == 0, result.output
    grad = layer(read_json(out), "fc")["gradient"]

    import torch

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2)).double().numpy()
    w, b = lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()
    logits = x @ w.T + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    onehot = np.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]]
    ref = (p - onehot) / 8
    assert grad["mean"] == pytest.approx(ref.mean(), abs=1e-7)
    assert grad["std"] == pytest.approx(ref.std(), rel=1e-5)
    assert grad["min"] == pytest.approx(ref.min(), rel=1e-5)


def test_two_argument_loss_keeps_working(write: Callable[..., Path], tmp_path: Path) -> None:
    source = TARGET_NET.replace("def example_target():\n    return torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])\n", "")
    loss = "def loss_fn(output, inputs):\n    return output.pow(2).mean()\n"
    model = write("model.py", source.format(loss=loss))
    out = tmp_path / "r.json"
    result = invoke("inspect", model, "--json", out)
    assert result.exit_code == 0, result.output
    grad = layer(read_json(out), "fc")["gradient"]
    # d/dy mean(y^2) = 2y / numel: its std is 2/24 of the output's std.
    act = layer(read_json(out), "fc")["activation"]
    assert grad["std"] == pytest.approx(act["std"] * 2 / 24, rel=1e-5)


@pytest.mark.parametrize(
    ("loss", "drop_target", "expected"),
    [
        ("def loss_fn(output, inputs):\n    return output.sum()\n", False, "its loss_fn takes no target"),
        ("", False, "defines example_target() but no loss_fn"),
        ("def loss_fn(output, inputs, target):\n    return output.sum()\n", True, "has no example_target()"),
    ],
)
def test_target_mismatches_are_one_line_exit_2(
    loss: str, drop_target: bool, expected: str, write: Callable[..., Path]
) -> None:
    source = TARGET_NET
    if drop_target:
        source = source.replace("def example_target():\n    return torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])\n", "")
    model = write("model.py", source.format(loss=loss))
    result = invoke("inspect", model)
    assert result.exit_code == 2
    assert expected in one_line(result)
