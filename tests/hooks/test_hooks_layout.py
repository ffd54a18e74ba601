"""The statistics layout: one named slot added to a copy of it reaches the decoded record and the merge across
ranks with no other edit (the slot carries its kernel and its merge rule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actdiag.hooks.keys import Key
from actdiag.hooks.layout import STATS, Merge, Slot, decode_tensor_stats
from actdiag.hooks.merge import KIND_STATS
from actdiag.hooks.stats import tensor_stats
from tests.reliability.test_rel_merge_protocol import FakeWorld, _merger, _run

ABS_SUM = Slot("abs_sum", Merge.SUM, kernel=lambda v: v.abs().sum())  # the L1 norm of the finite values
ABS_MAX = Slot("abs_max_slot", Merge.MAX, empty=-math.inf, kernel=lambda v: v.abs().amax())
EXTENDED = STATS.with_slot(ABS_SUM).with_slot(ABS_MAX)


def _finite(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64).ravel()
    return a[np.isfinite(a)]


def test_the_layout_names_every_slot() -> None:
    assert [s.name for s in STATS.slots] == ["count", "mean", "m2", "min", "max", "zero_count"]
    assert (STATS.COUNT, STATS.MEAN, STATS.M2, STATS.MIN, STATS.MAX, STATS.ZERO_COUNT) == (0, 1, 2, 3, 4, 5)
    assert STATS.lin(8) == slice(6, 14) and STATS.exp(8).start == 14 and STATS.length(8) == 14 + 255
    # A copy with more slots leaves the original and the built-in slots' indices alone.
    assert STATS.head == 6 and EXTENDED.head == 8 and EXTENDED.index("min") == STATS.MIN
    assert EXTENDED.ABS_SUM == 6 and EXTENDED.extra == (ABS_SUM, ABS_MAX)
    with pytest.raises(ValueError, match="slot names must be unique"):
        STATS.with_slot(Slot("mean", Merge.SUM))


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "estimated"])
def test_an_added_slot_reaches_the_decoded_record(path: str, exact: bool) -> None:
    x = torch.randn(20_000, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    x[3], x[99] = math.nan, -math.inf
    vec, meta = tensor_stats(x, layout=EXTENDED, path=path, exact=exact, sample_cap=4096)
    got = decode_tensor_stats(vec.numpy(), meta)
    fin = _finite(x.numpy())
    extra = dict(got.extra)
    assert extra["abs_sum"] == pytest.approx(np.abs(fin).sum(), rel=1e-12)
    assert extra["abs_max_slot"] == np.abs(fin).max() == got.abs_max
    # The built-in fields are what the plain layout gives.
    plain_vec, plain_meta = tensor_stats(x, path=path, exact=exact, sample_cap=4096)
    plain = decode_tensor_stats(plain_vec.numpy(), plain_meta)
    assert (got.count, got.mean, got.m2, got.min, got.max) == (plain.count, plain.mean, plain.m2, plain.min, plain.max)
    assert got.histogram.counts == plain.histogram.counts and got.exponents == plain.exponents
    assert plain.extra == ()
    # Empty: the slot's own empty value.
    empty_vec, empty_meta = tensor_stats(torch.zeros(0), layout=EXTENDED)
    assert dict(decode_tensor_stats(empty_vec.numpy(), empty_meta).extra) == {"abs_sum": 0.0, "abs_max_slot": -math.inf}


def test_an_added_slot_is_merged_across_ranks_by_its_own_rule() -> None:
    """Two ranks, each with its slice of a batch, merged through the merge protocol (ranks simulated by threads):
    the added slots merge by their rules (a sum, a max) to the whole batch's values, with the built-in ones."""
    g = np.random.default_rng(4)
    whole = (g.standard_normal((2, 3000)) * np.array([[1.0], [5.0]])).astype(np.float32)
    world, warnings = FakeWorld(2), []
    mergers = [_merger(world, r, warnings) for r in range(2)]
    key = Key.layer("fc", 0, "act")
    pendings = [{key: tensor_stats(torch.from_numpy(whole[r]), bins=8, layout=EXTENDED)} for r in range(2)]
    out = _run(world, mergers, pendings, {key: KIND_STATS})
    assert not warnings
    fin = _finite(whole)
    for r in range(2):
        merged = decode_tensor_stats(*out[r][key])
        extra = dict(merged.extra)
        assert extra["abs_sum"] == pytest.approx(np.abs(fin).sum(), rel=1e-9)
        assert extra["abs_max_slot"] == np.abs(fin).max()
        assert merged.count == fin.size and merged.mean == pytest.approx(fin.mean(), rel=1e-6)
        assert (merged.min, merged.max) == (fin.min(), fin.max())
