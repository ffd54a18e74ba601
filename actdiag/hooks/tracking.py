"""State the recorder keeps across recorded steps: how long each ReLU unit has been silent.

A unit that dies in training was alive at step 0, so an "ever active" mask (OR-ed since the first step) never
calls it dead. Instead each ReLU-family layer call keeps, per unit, its *streak*: the number of its latest recorded
calls in which it produced no positive output for any sample (0: active in the latest one). The streak is updated
in place on the output's device by `stats.unit_activity` (no read-back of its own), and each recorded step reads
back only a fixed-size summary: how many units have each streak length (lengths from `STREAK_BINS` on are pooled)
and the indices of the longest-silent units. The rules decide from the summary which streak counts as dead (their
window K, `Thresholds.dead_window`), so the recorder holds no threshold.

Memory: one int32 per unit and a short deque of step numbers per layer call, whatever the run's length.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from actdiag.records import UnitActivity

# Streak lengths 0 .. STREAK_BINS - 1 are counted one by one, longer ones pooled in the last bin: a rule window K
# (in recorded steps) up to STREAK_BINS - 1 is read exactly.
STREAK_BINS = 64
# How many of the longest-silent units a record names (a finding lists them; more would be noise).
UNIT_EXAMPLES = 8


@dataclass(slots=True)
class _Track:
    streak: torch.Tensor  # int32 per unit, on the activation's device
    steps: deque[int] = field(default_factory=lambda: deque(maxlen=STREAK_BINS + 1))  # steps of the latest calls
    calls: int = 0


class UnitStreaks:
    """Per-unit silence streaks of every ReLU-family layer call, kept for the whole watch."""

    def __init__(self) -> None:
        self._tracks: dict[tuple[str, int], _Track] = {}

    def streak_for(self, name: str, call: int, units: int, device: torch.device, step: int) -> torch.Tensor:
        """The streak tensor of this layer call (a fresh one when the layer changed shape or device), after noting
        that it is measured at `step`; the caller updates it in place."""
        track = self._tracks.get((name, call))
        if track is None or track.streak.shape[0] != units or track.streak.device != device:
            track = _Track(torch.zeros(units, dtype=torch.int32, device=device))
            self._tracks[(name, call)] = track
        if not track.steps or track.steps[-1] != step:
            track.steps.append(step)
            track.calls += 1
        return track.streak

    def summary(self, name: str, call: int) -> torch.Tensor:
        """[count of units per streak length (STREAK_BINS), indices of the longest-silent units, their streaks] as
        float64 on the streak's device: device ops only, read back with the step's other vectors."""
        streak = self._tracks[(name, call)].streak
        units = streak.shape[0]
        hist = torch.bincount(streak.clamp(max=STREAK_BINS - 1), minlength=STREAK_BINS)
        k = min(UNIT_EXAMPLES, units)
        # Ties go to the lowest index (a stable, readable list): the score orders by streak, then by index.
        score = streak.to(torch.int64) * units + (units - 1 - torch.arange(units, device=streak.device))
        top = torch.topk(score, k).indices
        return torch.cat([hist.to(torch.float64), top.to(torch.float64), streak[top].to(torch.float64)])

    def summaries(self, calls: list[tuple[str, int]]) -> list[torch.Tensor | np.ndarray]:
        """`summary` of each of `calls` (layer calls measured this step), in the same order. Streaks on the CPU
        are summarised together in numpy, a fixed number of calls per unit count however many layers share it:
        a deep network's ReLUs each paid a dozen small torch ops here. Others (a GPU's) keep to device ops."""
        out: list[torch.Tensor | np.ndarray | None] = [None] * len(calls)
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(calls):
            streak = self._tracks[key].streak
            if streak.device.type == "cpu":
                groups.setdefault(streak.shape[0], []).append(i)
            else:
                out[i] = self.summary(*key)
        for units, rows in groups.items():
            s = np.stack([self._tracks[calls[i]].streak.numpy() for i in rows])  # [K, units] int32
            k = len(rows)
            clipped = np.minimum(s, STREAK_BINS - 1)
            clipped += np.arange(k, dtype=np.int32)[:, None] * STREAK_BINS  # each row's bins offset into its own
            hist = np.bincount(clipped.reshape(-1), minlength=k * STREAK_BINS).reshape(k, STREAK_BINS)
            top_k = min(UNIT_EXAMPLES, units)
            # Longest streak first, ties to the lowest index (a stable sort of the negated streaks), as `summary`.
            top = np.argsort(-s, axis=1, kind="stable")[:, :top_k]
            vecs = np.concatenate([hist, top, np.take_along_axis(s, top, axis=1)], axis=1).astype(np.float64)
            for j, i in enumerate(rows):
                out[i] = vecs[j]
        return [v for v in out if v is not None]

    def decode(self, name: str, call: int, vec: np.ndarray, never: int) -> UnitActivity:
        """The record of one layer call from its read-back summary and its never-active count."""
        track = self._tracks[(name, call)]
        # No streak can exceed the calls so far: the bins past it are left out of the record.
        hist = tuple(vec[: min(STREAK_BINS, track.calls + 1)].astype(np.int64).tolist())
        k = (len(vec) - STREAK_BINS) // 2
        idx = vec[STREAK_BINS : STREAK_BINS + k].astype(np.int64).tolist()
        lengths = vec[STREAK_BINS + k :].astype(np.int64).tolist()
        steps = tuple(track.steps)
        # since[s]: the recorded step from which a unit silent for its last s calls has been silent.
        since = tuple(steps[-s] if 0 < s <= len(steps) else steps[0] for s in range(len(hist)))
        return UnitActivity(
            silent=hist,
            since=since,
            never=never,
            calls=track.calls,
            examples=tuple((i, n) for i, n in zip(idx, lengths, strict=True) if n > 0),
        )


def nonfinite_count(x: torch.Tensor) -> torch.Tensor:
    """The number of NaN/Inf elements of `x` as a 1-element float64 tensor on x's device (no sync)."""
    return torch.isfinite(x.detach()).logical_not_().sum().to(torch.float64).reshape(1)


# A gradient hook's name for the same measurement (it reads the gradient with respect to a module's input).
input_grad_nonfinite = nonfinite_count
