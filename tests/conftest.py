from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed_and_one_thread() -> Iterator[None]:
    """A fixed seed per test, and one torch thread: the test models are tiny, and with several threads torch spends
    more time synchronising them than computing (measured 60x slower per step on a busy two-core machine)."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI (CI=true, as .ci/run runs) a skip is a failure unless the test needs CUDA: CI installs chromium and
    every extra, so a browser or framework test that skipped there would be a test that cannot fail."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if "CUDA" not in reason:
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where nothing but CUDA may be missing: {reason}"
