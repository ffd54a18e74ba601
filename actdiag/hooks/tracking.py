"""State the recorder keeps across recorded steps: how long each ReLU unit has been silent.

A unit that dies in training was alive at step 0, so an "ever active" mask (OR-ed since the first step) never
calls it dead. Instead each ReLU-family layer call keeps, per unit, its *streak*: the number of its latest recorded
calls in which it produced no positive output for any sample (0: active in the latest one). The streak is updated
in place on the output's device by `stats.unit_activity` (no read-back of its own; on the device path by
`DeviceUnits`, once for all of a step's outputs of one shape), and each recorded step reads back only a fixed-size
summary (`UnitStreaks.summaries`, once per unit count): how many units have each streak length (lengths from
`STREAK_BINS` on are pooled) and the indices of the longest-silent units. The rules decide from the summary which
streak counts as dead (their window K, `Thresholds.dead_window`), so the recorder holds no threshold.

Memory: one int32 per unit and a short deque of step numbers per layer call, whatever the run's length.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from actdiag.hooks.device import _bin_counts
from actdiag.hooks.stats import unit_activity_device, unit_positive_counts
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
        self._constants: dict[tuple[Any, ...], torch.Tensor] = {}  # `_device_summaries`' index tensors
        # `decode`'s `since` per (steps of the latest calls, length): the layers of a step nearly all share them
        self._since: dict[tuple[tuple[int, ...], int], tuple[int, ...]] = {}

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

    def summaries(self, calls: list[tuple[str, int]], numpy: bool = True) -> list[torch.Tensor | np.ndarray]:
        """`summary` of each of `calls` (layer calls measured this step), in the same order, with a fixed number of
        calls per unit count however many layers share it (a deep network's ReLUs each paid a dozen small ops
        here): CPU streaks in numpy (unless `numpy=False`: the device path's ops, counted on the CPU by
        bench/count_ops.py), others (a GPU's) with device ops on all the streaks of a unit count stacked."""
        out: list[torch.Tensor | np.ndarray | None] = [None] * len(calls)
        groups: dict[tuple[int, torch.device], list[int]] = {}
        for i, key in enumerate(calls):
            streak = self._tracks[key].streak
            groups.setdefault((streak.shape[0], streak.device), []).append(i)
        for (_, device), rows in groups.items():
            streaks = [self._tracks[calls[i]].streak for i in rows]
            vecs: torch.Tensor | np.ndarray
            if device.type == "cpu" and numpy:
                vecs = _numpy_summaries(np.stack([s.numpy() for s in streaks]))
            else:
                vecs = self._device_summaries(streaks)
            for j, i in enumerate(rows):
                out[i] = vecs[j]
        return [v for v in out if v is not None]

    def _device_summaries(self, streaks: list[torch.Tensor]) -> torch.Tensor:
        """[K, STREAK_BINS + 2 k] float64 summaries of K streaks of one unit count on one device (`summary`'s
        layout), by a fixed number of device ops: one count of every streak's bins (each row's bins offset into a
        block of its own), one top-k along the rows."""
        s = streaks[0][None] if len(streaks) == 1 else torch.stack(streaks)
        k_rows, units = s.shape
        device = s.device
        top_k = min(UNIT_EXAMPLES, units)
        keys = s.clamp(max=STREAK_BINS - 1)
        if k_rows > 1:  # each row's bins offset into a block of its own
            keys += self._constant(("offsets", k_rows), device, lambda: _row_offsets(k_rows, device))
        hist = _bin_counts(keys.reshape(-1), k_rows * STREAK_BINS, float64=False).view(k_rows, STREAK_BINS)
        # Longest streak first, ties to the lowest index: the score orders by streak, then by reversed index.
        rev = self._constant(("rev", units), device, lambda: units - 1 - torch.arange(units, device=device))
        top = torch.topk(torch.add(rev, s, alpha=units), top_k, dim=1).indices
        out = torch.empty((k_rows, STREAK_BINS + 2 * top_k), dtype=torch.float64, device=device)
        out[:, :STREAK_BINS] = hist
        out[:, STREAK_BINS : STREAK_BINS + top_k] = top
        out[:, STREAK_BINS + top_k :] = s.gather(1, top)
        return out

    def _constant(self, key: tuple[str, int], device: torch.device, make: Any) -> torch.Tensor:
        """The tensor `make()` (made on `device`: no copy from the host) once, kept across steps."""
        t = self._constants.get((*key, device))
        if t is None:
            t = self._constants[(*key, device)] = make()
        return t

    def state(self, name: str, call: int) -> tuple[int, tuple[int, ...]]:
        """What `activity` reads of a layer call's track as it is now: its calls so far and the steps of the
        latest ones (a record built later must not see the calls made since)."""
        track = self._tracks[(name, call)]
        return track.calls, tuple(track.steps)

    def activity(self, vec: np.ndarray, never: int, calls: int, steps: tuple[int, ...]) -> UnitActivity:
        """The record of a layer call from its read-back summary, never-active count and `state`."""
        # No streak can exceed the calls so far: the bins past it are left out of the record.
        hist = tuple(vec[: min(STREAK_BINS, calls + 1)].astype(np.int64).tolist())
        k = (len(vec) - STREAK_BINS) // 2
        idx = vec[STREAK_BINS : STREAK_BINS + k].astype(np.int64).tolist()
        lengths = vec[STREAK_BINS + k :].astype(np.int64).tolist()
        # since[s]: the recorded step from which a unit silent for its last s calls has been silent.
        since = self._since.get((steps, len(hist)))
        if since is None:
            if len(self._since) >= 64:
                self._since.clear()
            since = tuple(steps[-s] if 0 < s <= len(steps) else steps[0] for s in range(len(hist)))
            self._since[(steps, len(hist))] = since
        return UnitActivity(
            silent=hist,
            since=since,
            never=never,
            calls=calls,
            examples=tuple((i, n) for i, n in zip(idx, lengths, strict=True) if n > 0),
        )


def _row_offsets(k_rows: int, device: torch.device) -> torch.Tensor:
    return torch.arange(k_rows, dtype=torch.int32, device=device)[:, None] * STREAK_BINS


def _numpy_summaries(s: np.ndarray) -> np.ndarray:
    """`UnitStreaks.summary` of each row of int32 `s` [K, units] (CPU streaks), in numpy."""
    k, units = s.shape
    clipped = np.minimum(s, STREAK_BINS - 1)
    clipped += np.arange(k, dtype=np.int32)[:, None] * STREAK_BINS  # each row's bins offset into its own
    hist = np.bincount(clipped.reshape(-1), minlength=k * STREAK_BINS).reshape(k, STREAK_BINS)
    top_k = min(UNIT_EXAMPLES, units)
    # Longest streak first, ties to the lowest index (a stable sort of the negated streaks), as `summary`.
    top = np.argsort(-s, axis=1, kind="stable")[:, :top_k]
    return np.concatenate([hist, top, np.take_along_axis(s, top, axis=1)], axis=1).astype(np.float64)


class DeviceUnits:
    """The device path's per-unit activity of a step's ReLU-family outputs, with a fixed number of ops per output
    shape instead of a dozen per output (each a kernel launch on a GPU): the hook counts each unit's positive values
    (`stats.unit_positive_counts`, two ops; the output may change in place before the step ends), and `finish()`
    turns the counts of all outputs of one shape into dead/rare/never counts, updating their ever-active masks and
    silence streaks, in one `stats.unit_activity_device` call."""

    def __init__(self) -> None:
        # key -> (group, row); group (units, samples, device) -> counts, ever-active masks, streaks
        self._groups: dict[tuple[int, int, torch.device], _UnitGroup] = {}

    def take(self, key: Any, y: torch.Tensor, unit_dim: int, ever: torch.Tensor, streak: torch.Tensor) -> None:
        """Count the positive values of each unit of `y` now; the rest when the step ends."""
        units = y.shape[unit_dim]
        group = (units, y.numel() // max(units, 1), y.device)
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _UnitGroup([], [], [], [])
        g.keys.append(key)
        g.active.append(unit_positive_counts(y, unit_dim))
        g.ever.append(ever)
        g.streaks.append(streak)

    def finish(self, rare_below: float) -> dict[Any, torch.Tensor]:
        """[dead, rare, never] float64 counts on the device per key taken this step; the batch is emptied."""
        groups, self._groups = self._groups, {}
        out: dict[Any, torch.Tensor] = {}
        for (_, samples, _), g in groups.items():
            active = g.active[0][None] if len(g.active) == 1 else torch.stack(g.active)
            counts = unit_activity_device(active, samples, g.ever, g.streaks, rare_below)
            out.update(zip(g.keys, counts, strict=True))
        return out

    def clear(self) -> None:
        self._groups = {}

    def __len__(self) -> int:
        return sum(len(g.keys) for g in self._groups.values())


class _UnitGroup(NamedTuple):
    keys: list[Any]
    active: list[torch.Tensor]
    ever: list[torch.Tensor]
    streaks: list[torch.Tensor]


def nonfinite_count(x: torch.Tensor) -> torch.Tensor:
    """The number of NaN/Inf elements of `x` as a 1-element float64 tensor on x's device (no sync). Three device
    ops: x * 0 is NaN exactly where x is NaN or +-Inf, and a sum of booleans straight into float64
    (`torch.isfinite` alone is four)."""
    return torch.sum((x.detach() * 0).isnan(), dtype=torch.float64).reshape(1)


# A gradient hook's name for the same measurement (it reads the gradient with respect to a module's input).
input_grad_nonfinite = nonfinite_count
