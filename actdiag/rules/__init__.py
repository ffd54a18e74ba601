"""Rules: small pure functions from records to findings. Filled in by the diagnosis work (issue 3)."""

from __future__ import annotations

from collections.abc import Sequence

from actdiag.records import Finding, History, LayerStats, ParamStats


def diagnose(
    layers: Sequence[LayerStats], params: Sequence[ParamStats] = (), history: History | None = None
) -> tuple[Finding, ...]:
    """Findings for one recorded step (in forward order) and its history, ranked most severe first."""
    return ()
