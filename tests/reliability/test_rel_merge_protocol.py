"""The merge protocol of actdiag.hooks.merge.StepMerger, with ranks simulated by threads: gathers always have equal
sizes on every rank (a mismatch aborts gloo), the payload capacity is agreed once and re-agreed only when a step
outgrows it, and ranks that recorded different layers keep their own statistics with a warning."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

from actdiag.hooks.keys import Key
from actdiag.hooks.merge import KIND_STATS, KIND_SUM, KIND_UNITS, StepMerger
from actdiag.hooks.stats import decode_tensor_stats, tensor_stats

from .rel_reference import np_stats

Pending = dict[Key, tuple[torch.Tensor, Any]]


class FakeWorld:
    """An all_gather between threads; it fails the test if the ranks ever gather different sizes."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=20)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.sizes: list[list[int]] = []

    def gather(self, rank: int, flat: torch.Tensor) -> np.ndarray:
        self.slots[rank] = flat.clone()
        self.barrier.wait()
        sizes = [s.numel() for s in self.slots if s is not None]
        if rank == 0:
            self.sizes.append(sizes)
        assert len(set(sizes)) == 1, f"ranks gathered different sizes {sizes}: gloo would abort"
        rows = torch.stack([s for s in self.slots if s is not None]).numpy()
        self.barrier.wait()
        return rows


def _merger(world: FakeWorld, rank: int, warnings: list[str]) -> StepMerger:
    m = StepMerger(bins=8, rare_below=0.01, on_mismatch=warnings.append)
    m._device = lambda: torch.device("cpu")  # type: ignore[method-assign]
    m._rank = lambda: rank  # type: ignore[method-assign]
    m._gather = lambda flat: world.gather(rank, flat)  # type: ignore[method-assign]
    return m


def _run(world: FakeWorld, mergers: list[StepMerger], pendings: list[Pending], kinds: dict) -> list[dict]:  # type: ignore[type-arg]
    out: list[dict] = [{} for _ in mergers]  # type: ignore[type-arg]
    errors: list[BaseException] = []

    def work(r: int) -> None:
        try:
            out[r] = mergers[r].merge(pendings[r], kinds)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            world.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(mergers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return out


def _stats(x: np.ndarray) -> tuple[torch.Tensor, Any]:
    return tensor_stats(torch.from_numpy(x), bins=8)


def _pending(x: np.ndarray, relu: np.ndarray, extra: bool = False) -> tuple[Pending, dict]:  # type: ignore[type-arg]
    p: Pending = {Key.layer("fc", 0, "act"): _stats(x)}
    kinds = {Key.layer("fc", 0, "act"): KIND_STATS}
    sat = torch.tensor([float((np.abs(x) > 1).sum())], dtype=torch.float64)
    p[Key.layer("fc", 0, "sat")] = (sat, x.size)
    kinds[Key.layer("fc", 0, "sat")] = KIND_SUM
    active = torch.from_numpy((relu > 0).sum(axis=0).astype(np.float64))
    ever = (active > 0).to(torch.float64)
    p[Key.layer("relu", 0, "unitvec")] = (torch.cat([active, ever]), relu.shape[0])
    kinds[Key.layer("relu", 0, "unitvec")] = KIND_UNITS
    if extra:
        p[Key.layer("only_on_this_rank", 0, "act")] = _stats(x[:3])
        kinds[Key.layer("only_on_this_rank", 0, "act")] = KIND_STATS
    return p, kinds


def test_rel_protocol_merges_and_agrees_capacity_once() -> None:
    rng = np.random.default_rng(0)
    world = FakeWorld(2)
    warnings: list[str] = []
    mergers = [_merger(world, r, warnings) for r in range(2)]
    for _step in range(3):
        xs = [rng.normal(size=(5, 4)) * (r + 1) for r in range(2)]
        relus = [np.maximum(rng.normal(size=(5, 6)) - 1.5, 0) for _ in range(2)]
        built = [_pending(xs[r], relus[r]) for r in range(2)]
        out = _run(world, mergers, [b[0] for b in built], built[0][1])
        assert out[0].keys() == out[1].keys()
        for key in out[0]:
            np.testing.assert_array_equal(out[0][key][0], out[1][key][0])
        vec, meta = out[0][Key.layer("fc", 0, "act")]
        got = decode_tensor_stats(vec, meta)
        ref = np_stats(np.concatenate([x.ravel() for x in xs]))
        assert got.count == ref["count"] == 40 and got.min == ref["min"] and got.max == ref["max"]
        assert got.mean == pytest.approx(ref["mean"], rel=1e-12) and got.m2 == pytest.approx(ref["m2"], rel=1e-12)
        sat, n = out[0][Key.layer("fc", 0, "sat")]
        assert sat[0] == sum((np.abs(x) > 1).sum() for x in xs) and n == 40
        dead, rare, never = out[0][Key.layer("relu", 0, "units")][0]
        active = sum((r > 0).sum(axis=0) for r in relus)
        assert dead == (active == 0).sum() and never == (active == 0).sum() and rare == (active < 0.1).sum()
    assert not warnings
    # step 0: the header-only gather, then the agreed size; later steps: one gather each
    assert [s[0] for s in world.sizes] == [2] + [world.sizes[1][0]] * 3 and world.sizes[1][0] > 2
    # a step that records more on every rank outgrows the capacity: the ranks agree on a larger one, once
    built = [_pending(xs[r], relus[r], extra=True) for r in range(2)]
    out = _run(world, mergers, [b[0] for b in built], built[0][1])
    assert decode_tensor_stats(*out[0][Key.layer("only_on_this_rank", 0, "act")]).count == 2 * 3 * 4
    assert len(world.sizes) == 6 and world.sizes[4] == world.sizes[3] and world.sizes[5][0] > world.sizes[4][0]
    assert not warnings


def test_rel_protocol_rank_dependent_layers_keep_own_stats_and_warn() -> None:
    rng = np.random.default_rng(1)
    world = FakeWorld(2)
    warnings: list[str] = []
    mergers = [_merger(world, r, warnings) for r in range(2)]
    xs = [rng.normal(size=(5, 4)) for _ in range(2)]
    relu = np.maximum(rng.normal(size=(5, 6)), 0)
    p0, kinds = _pending(xs[0], relu)
    p1, kinds1 = _pending(xs[1], relu, extra=True)  # rank 1 recorded one more layer: a longer payload
    out = _run(world, mergers, [p0, p1], {**kinds, **kinds1})
    assert len(warnings) == 2 and "different layers" in warnings[0]
    own = decode_tensor_stats(*out[0][Key.layer("fc", 0, "act")])
    assert own.count == 20 and own.mean == pytest.approx(xs[0].mean(), rel=1e-12)  # rank 0's own, unmerged
    assert Key.layer("only_on_this_rank", 0, "act") in out[1]
    assert all(len(set(s)) == 1 for s in world.sizes)  # and nobody gathered mismatched sizes
    # a later step with equal layouts merges again
    p0, kinds = _pending(xs[0], relu)
    p1, _ = _pending(xs[1], relu)
    out = _run(world, mergers, [p0, p1], kinds)
    assert decode_tensor_stats(*out[0][Key.layer("fc", 0, "act")]).count == 40
    assert len(warnings) == 2


def test_rel_protocol_nothing_recorded_on_every_rank() -> None:
    world = FakeWorld(2)
    mergers = [_merger(world, r, []) for r in range(2)]
    out = _run(world, mergers, [{}, {}], {})
    assert out == [{}, {}]
