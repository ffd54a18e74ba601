"""Helpers shared by the integration tests (not a test module)."""

from __future__ import annotations

from pathlib import Path


def actdiag_tags(logdir: Path) -> set[str]:
    """Every histogram and scalar tag in the event files directly inside `logdir` (one TensorBoard run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    return set(tags.get("histograms", [])) | set(tags.get("scalars", [])) | set(tags.get("tensors", []))
