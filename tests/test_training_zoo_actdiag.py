"""What actdiag should say on each run of the training zoo (tests/training_zoo.py), watched at every recorded step.

One test per case. A planted case must produce a finding with the labelled code at the labelled layer, with an
acceptable fix and none of the forbidden ones, and (for events in training) the step and pass the label gives; a
healthy control must produce no warning or error. The labels themselves are proven without actdiag in
tests/test_training_zoo_labels.py.

Cases that current actdiag gets wrong are marked xfail(strict=True) with the issue 19 item that fixes them: this is
the implementers' to-do list. When a feature lands its test starts to pass, the strict marker turns that into a
failure, and the marker must be removed then. `python bench/zoo_report.py` prints the same comparison as a table.
"""

from __future__ import annotations

import warnings

import pytest

import actdiag
from tests.training_zoo import CASES, Case, describe, judge

# Case name -> why current actdiag misses it (the issue 19 Deliver item that is to fix it).
MISSED: dict[str, str] = {}


def _param(case: Case) -> object:
    if case.name in MISSED:
        return pytest.param(case, id=case.name, marks=pytest.mark.xfail(strict=True, reason=MISSED[case.name]))
    return pytest.param(case, id=case.name)


def test_missed_names_are_cases() -> None:
    assert set(MISSED) <= {c.name for c in CASES}


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_actdiag_on_the_training_zoo(case: Case) -> None:
    run = case.make()
    with warnings.catch_warnings():
        # The runs that go non-finite on purpose make torch and numpy warn; strict=True still raises on any failure
        # of actdiag itself.
        warnings.simplefilter("ignore", RuntimeWarning)
        with actdiag.watch(run.model, every=case.every, strict=True) as monitor:
            run.train(monitor.step)
    findings = monitor.findings
    verdict = judge(case.label, findings)
    seen = [describe(f) for f in findings]
    if case.label.healthy:
        assert not verdict.false_alarms, f"false alarms on a healthy run: {seen}"
    else:
        assert verdict.detected, f"{case.label.code}: {verdict.why}; actdiag said {seen}"


def test_zoo_report_prints_the_table_and_the_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/zoo_report.py, on two controls: one row each and the summary line the lead quotes."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))  # the script imports its sibling _common
    spec = importlib.util.spec_from_file_location("actdiag_bench_zoo_report", bench / "zoo_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    rows = module.main(["healthy_mlp", "fp32_twin_adam"])
    out = capsys.readouterr().out
    assert [r.case.name for r in rows] == ["fp32_twin_adam", "healthy_mlp"]
    assert "| healthy_mlp | 0 | healthy | - | quiet |" in out
    assert out.rstrip().endswith("detected 0 / 0 planted, false alarms 0 / 2 healthy runs, crashes 0")
    with pytest.raises(SystemExit):
        module.main(["no_such_case"])
