"""Setting thresholds (actdiag.Thresholds): from a dict, from text, from pyproject.toml; unknown names and bad values
are one ValueError listing the valid names; the setting changes the diagnosis; every documented example runs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import actdiag
from actdiag.rules import thresholds as th
from actdiag.rules.thresholds import (
    DEFAULT_THRESHOLDS,
    Thresholds,
    find_pyproject,
    make_thresholds,
    parse_threshold_option,
    pyproject_thresholds,
    threshold_names,
)
from tests.zoo import SaturatedTanhNet, XavierTanhNet, example

ROOT = Path(__file__).resolve().parents[2]


def test_public_name() -> None:
    assert actdiag.Thresholds is Thresholds
    assert "Thresholds" in actdiag.__all__


def test_every_field_is_settable_from_text() -> None:
    """Generic over the dataclass's fields: whatever fields it has, each one round-trips through text."""
    for field in dataclasses.fields(Thresholds):
        value = getattr(DEFAULT_THRESHOLDS, field.name)
        t = make_thresholds({field.name: str(value)})
        assert getattr(t, field.name) == value
        assert type(getattr(t, field.name)) is type(value)
    assert threshold_names() == tuple(f.name for f in dataclasses.fields(Thresholds))


def test_mapping_over_base_and_passthrough() -> None:
    t = make_thresholds({"saturation_fraction_at_least": 0.3, "dead_min_samples": "16"})
    assert t.saturation_fraction_at_least == 0.3 and t.dead_min_samples == 16
    assert t.dead_fraction_above == DEFAULT_THRESHOLDS.dead_fraction_above
    again = make_thresholds({"dead_fraction_above": 0.7}, base=t)
    assert (again.saturation_fraction_at_least, again.dead_fraction_above) == (0.3, 0.7)
    assert make_thresholds(t) is t and make_thresholds(None) is DEFAULT_THRESHOLDS
    assert make_thresholds({"exploding_ratio_above": "inf"}).exploding_ratio_above == float("inf")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"saturation_fraction": 0.3}, "unknown threshold saturation_fraction (pyproject.toml); valid names: "),
        ({"a": 1, "b": 2}, "unknown thresholds a, b"),
        ({"saturation_fraction_at_least": "x"}, "saturation_fraction_at_least='x' (pyproject.toml) is not a number"),
        ({"saturation_fraction_at_least": True}, "is not a number"),
        ({"saturation_fraction_at_least": float("nan")}, "is not a number"),
        ({"dead_min_samples": 2.5}, "is not an integer"),
        ({"dead_min_samples": [1]}, "is not an integer"),
    ],
)
def test_bad_names_and_values(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        make_thresholds(values, origin="pyproject.toml")
    assert message in str(info.value)
    if "unknown" in message:
        assert str(info.value).endswith(", ".join(threshold_names()))


def test_not_a_mapping() -> None:
    with pytest.raises(TypeError, match="got list"):
        make_thresholds([("a", 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["a", "=1", "a=", " = "])
def test_option_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="is not NAME=VALUE"):
        parse_threshold_option(text)
    assert parse_threshold_option(" a = 1e-3 ") == ("a", "1e-3")


def test_inspect_thresholds_change_the_diagnosis() -> None:
    model = SaturatedTanhNet(width=64, depth=4)
    x = example(model)
    report = actdiag.inspect(model, x)
    assert "saturation" in [f.code for f in report.findings]
    worst = max(layer.saturation or 0.0 for layer in report.layers)
    quiet = actdiag.inspect(model, x, thresholds=Thresholds(saturation_fraction_at_least=worst + 1e-6))
    assert "saturation" not in [f.code for f in quiet.findings]
    as_dict = actdiag.inspect(model, x, thresholds={"saturation_fraction_at_least": worst + 1e-6})
    assert "saturation" not in [f.code for f in as_dict.findings]
    # And a healthy model gains it when the bar drops to its own (small) share.
    healthy = XavierTanhNet(width=64, depth=4)
    base = actdiag.inspect(healthy, example(healthy))
    assert "saturation" not in [f.code for f in base.findings]
    share = max(layer.saturation or 0.0 for layer in base.layers)
    assert share > 0
    low = actdiag.inspect(healthy, example(healthy), thresholds={"saturation_fraction_at_least": share})
    assert "saturation" in [f.code for f in low.findings]


def test_inspect_unknown_threshold_is_value_error() -> None:
    model = XavierTanhNet(width=8, depth=2)
    with pytest.raises(ValueError, match="unknown threshold saturation_fraction; valid names: vanishing_ratio_below"):
        actdiag.inspect(model, example(model), thresholds={"saturation_fraction": 0.3})


def test_watch_thresholds_reach_the_findings() -> None:
    model = SaturatedTanhNet(width=32, depth=3)
    x = example(model)
    with actdiag.watch(model, every=1, thresholds={"saturation_fraction_at_least": 1.01}) as monitor:
        model(x).sum().backward()
        monitor.step()
    assert "saturation" not in [f.code for f in monitor.findings]


def test_find_pyproject_stops_at_the_nearest(tmp_path: Path) -> None:
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "pyproject.toml").write_text("[tool.actdiag.thresholds]\nmin_history = 3\n")
    assert find_pyproject(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "pyproject.toml"
    assert find_pyproject(tmp_path / "a" / "b" / "c" / "model.py") == tmp_path / "a" / "pyproject.toml"
    (tmp_path / "a" / "b" / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert find_pyproject(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "pyproject.toml"
    assert pyproject_thresholds(tmp_path / "a" / "b" / "pyproject.toml") == {}
    assert pyproject_thresholds(tmp_path / "a" / "pyproject.toml") == {"min_history": 3}


def test_pyproject_table_of_the_wrong_kind(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.actdiag]\nthresholds = 3\n")
    with pytest.raises(ValueError, match=r"\[tool\.actdiag\.thresholds\] in .* must be a table"):
        pyproject_thresholds(path)


# ------------------------------------------------------------------------------------------------ documented examples
_CALL = re.compile(r"Thresholds\(([^()]*)\)")


def _documented_calls() -> list[tuple[str, str]]:
    """Every `Thresholds(...)` written in the docs: thresholds.py's docstrings, README, the package docstring."""
    texts = {
        "thresholds.py": Path(th.__file__).read_text(),
        "README.md": (ROOT / "README.md").read_text(),
        "rules/__init__.py": (ROOT / "actdiag" / "rules" / "__init__.py").read_text(),
    }
    return [(where, m.group(0)) for where, text in texts.items() for m in _CALL.finditer(text) if "=" in m.group(1)]


def test_every_documented_example_runs() -> None:
    calls = _documented_calls()
    assert calls, "the docs show how to set a threshold"
    for where, call in calls:
        t = eval(call, {"Thresholds": Thresholds})  # noqa: S307 - our own documentation
        assert isinstance(t, Thresholds), (where, call)
    for where, option in _documented_options():
        name, value = parse_threshold_option(option)
        assert isinstance(make_thresholds({name: value}, origin=where), Thresholds)


def _documented_options() -> list[tuple[str, str]]:
    """Every `--threshold NAME=VALUE` in the README and the command's help, and every `NAME = value` line of a
    [tool.actdiag.thresholds] block in the README."""
    from actdiag.cli import INSPECT_HELP

    readme = (ROOT / "README.md").read_text()
    option = r"--threshold[ =]([a-z_][a-z0-9_]*=[^\s`]+)"
    found = [
        (where, m.group(1))
        for where, text in (("README.md", readme), ("--help", INSPECT_HELP))
        for m in re.finditer(option, text)
    ]
    for block in re.findall(r"\[tool\.actdiag\.thresholds\]\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                name, _, value = line.partition("=")
                found.append(("README.md", f"{name.strip()}={value.split('#')[0].strip()}"))
    return found
