"""The device path's per-step batches (each op a kernel launch on a GPU, so a step's outputs of one shape share
them): unit counts and silence streaks, streak summaries, NaN/Inf counts, update ratios, and a weight measured with
its gradient. Each against the host path and a float64/numpy reference, with NaN/Inf and several shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actdiag.hooks import fused
from actdiag.hooks.device import DeviceBatch, exact_stats
from actdiag.hooks.layout import decode_tensor_stats
from actdiag.hooks.sampling import _SAMPLES
from actdiag.hooks.stats import unit_activity, unit_activity_rows
from actdiag.hooks.tracking import STREAK_BINS, UNIT_EXAMPLES, DeviceUnits, UnitStreaks, nonfinite_count
from actdiag.hooks.updates import UpdateRows, _tensor_ratios

RARE = 0.01
# (shape, unit dim): a linear layer's output, a conv's, a sequence's; two shapes share a unit count.
SHAPES = [((300, 8), 1), ((3, 8, 5, 7), 1), ((4, 6, 10), 2), ((50, 10), 1)]


def reference_counts(y: np.ndarray, unit_dim: int, ever: np.ndarray) -> tuple[list[int], np.ndarray]:
    """[dead, rare, never] of float64 `y` and the updated ever-active mask: NaN and Inf are compared as values
    (NaN is not positive, +Inf is)."""
    units = y.shape[unit_dim]
    active = (np.moveaxis(y, unit_dim, 0).reshape(units, -1) > 0).sum(axis=1)
    samples = y.size // units
    alive = active > 0
    ever = ever | alive
    return [int((~alive).sum()), int((active < RARE * samples).sum()), int((~ever).sum())], alive


def outputs(step: int, shape: tuple[int, ...], k: int) -> torch.Tensor:
    """Output k of one shape at `step`: mostly negative (some units rare or dead), with NaN, +Inf and -Inf."""
    g = torch.Generator().manual_seed(1000 * step + 10 * k + len(shape))
    y = torch.randn(*shape, generator=g) - 2.3 + 0.4 * step
    flat = y.view(-1)
    flat[:: 37 + k] = math.nan
    flat[5 + k] = math.inf
    flat[11 + k] = -math.inf
    return y


def test_device_units_match_the_host_rows_and_numpy_over_steps() -> None:
    """DeviceUnits (the recorder's device path: two ops in the hook, the rest once per shape) against the host
    path's numpy rows and a numpy reference: the counts, and the ever-active masks and streaks kept across steps."""
    per_shape = 3
    keys = [(s, k) for s in range(len(SHAPES)) for k in range(per_shape)]
    dev_ever = {key: torch.zeros(SHAPES[key[0]][0][SHAPES[key[0]][1]], dtype=torch.bool) for key in keys}
    host_ever = {key: t.clone() for key, t in dev_ever.items()}
    dev_streak = {key: torch.zeros(t.shape[0], dtype=torch.int32) for key, t in dev_ever.items()}
    host_streak = {key: t.clone() for key, t in dev_streak.items()}
    ref_ever = {key: np.zeros(t.shape[0], dtype=bool) for key, t in dev_ever.items()}
    ref_streak = {key: np.zeros(t.shape[0], dtype=np.int64) for key, t in dev_ever.items()}
    units = DeviceUnits()
    for step in range(3):
        ys = {(s, k): outputs(step, SHAPES[s][0], k) for s, k in keys}
        for (s, k), y in ys.items():
            units.take((s, k), y, SHAPES[s][1], dev_ever[(s, k)], dev_streak[(s, k)])
        assert len(units) == len(keys)
        got = units.finish(RARE)
        assert len(units) == 0 and set(got) == set(keys)
        for s, (shape, udim) in enumerate(SHAPES):
            group = [(s, k) for k in range(per_shape)]
            rows = np.stack([ys[key].numpy() for key in group])
            host = unit_activity_rows(
                rows, shape, udim, [host_ever[key] for key in group], [host_streak[key] for key in group], RARE
            )
            for j, key in enumerate(group):
                want, alive = reference_counts(ys[key].double().numpy(), udim, ref_ever[key])
                ref_ever[key] |= alive
                ref_streak[key] = np.where(alive, 0, ref_streak[key] + 1)
                assert got[key].dtype == torch.float64
                assert got[key].tolist() == want == host[j].tolist(), (step, key)
                np.testing.assert_array_equal(dev_ever[key].numpy(), ref_ever[key])
                np.testing.assert_array_equal(host_ever[key].numpy(), ref_ever[key])
                np.testing.assert_array_equal(dev_streak[key].numpy(), ref_streak[key])
                np.testing.assert_array_equal(host_streak[key].numpy(), ref_streak[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("shape", "unit_dim"), SHAPES)
def test_unit_activity_device_alone_matches_numpy(shape: tuple[int, ...], unit_dim: int, dtype: torch.dtype) -> None:
    """One output on the device path (a single row: updated through views, no stack), NaN and Inf included."""
    y = outputs(0, shape, 1).to(dtype)
    units = shape[unit_dim]
    ever = torch.zeros(units, dtype=torch.bool)
    ever[0] = True
    streak = torch.full((units,), 4, dtype=torch.int32)
    before = ever.numpy().copy()
    got = unit_activity(y, unit_dim, ever, RARE, path="device", streak=streak)
    want, alive = reference_counts(y.double().numpy(), unit_dim, before)
    assert got.tolist() == want
    np.testing.assert_array_equal(ever.numpy(), before | alive)
    np.testing.assert_array_equal(streak.numpy(), np.where(alive, 0, 5))


def test_unit_activity_device_wants_every_streak_or_none() -> None:
    from actdiag.hooks.stats import unit_activity_device

    active = torch.ones(2, 3, dtype=torch.int64)
    evers = [torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)]
    with pytest.raises(ValueError, match="streak for every output"):
        unit_activity_device(active, 4, evers, [torch.zeros(3, dtype=torch.int32), None], RARE)


def test_device_summaries_match_numpy_and_the_per_call_summary() -> None:
    """Streak summaries stacked per unit count (device ops) equal the numpy path's and the per-call summary: the
    streak histogram (long streaks pooled in the last bin) and the longest-silent units, ties to the lowest index."""
    streaks = UnitStreaks()
    g = torch.Generator().manual_seed(4)
    calls = []
    for i, (units, high) in enumerate([(5, 3), (64, 80), (64, 3), (3, 80), (64, 2), (100, 70), (5, 200)]):
        s = streaks.streak_for("relu", i, units, torch.device("cpu"), 0)
        s.copy_(torch.randint(0, high, (units,), generator=g, dtype=torch.int32))
        calls.append(("relu", i))
    device = streaks.summaries(calls, False)
    host = streaks.summaries(calls)
    assert len(device) == len(host) == len(calls)
    for call, d, h in zip(calls, device, host, strict=True):
        s = streaks._tracks[call].streak.numpy().astype(np.int64)
        units = s.size
        ref_hist = np.bincount(np.minimum(s, STREAK_BINS - 1), minlength=STREAK_BINS)
        ref_top = sorted(range(units), key=lambda i: (-s[i], i))[: min(UNIT_EXAMPLES, units)]
        want = np.concatenate([ref_hist, ref_top, s[ref_top]]).astype(np.float64)
        assert isinstance(d, torch.Tensor) and d.dtype == torch.float64
        np.testing.assert_array_equal(d.numpy(), want)
        np.testing.assert_array_equal(np.asarray(h), want)
        np.testing.assert_array_equal(streaks.summary(*call).numpy(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_count_matches_numpy(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(37, 11, generator=g) * 1e4).to(dtype)  # float16's largest is 65504: some overflow to Inf
    x.view(-1)[::13] = math.nan
    x[2, 3], x[4, 5] = math.inf, -math.inf
    a = x.double().numpy()
    got = nonfinite_count(x)
    assert got.dtype == torch.float64 and got.shape == (1,)
    assert got.item() == int((~np.isfinite(a)).sum()) > 30
    assert nonfinite_count(x.t()).item() == got.item()  # non-contiguous
    assert nonfinite_count(torch.empty(0, dtype=dtype)).item() == 0


def test_tensor_ratios_match_a_float64_reference() -> None:
    """The foreach norms of the weights UpdateRows does not take (large and exact, float64, sampled): one group per
    dtype; a weight replaced by one of another size gets no ratio."""
    g = torch.Generator().manual_seed(6)
    before = {
        "a": torch.randn(5000, generator=g),
        "b": torch.randn(3000, generator=g).half(),
        "c": torch.randn(700, generator=g, dtype=torch.float64),
        "d": torch.randn(9000, generator=g),
        "gone": torch.randn(100, generator=g),
    }
    idx = _SAMPLES.get(9000, 512, torch.device("cpu"))
    snaps = {name: (None, w.clone()) for name, w in before.items()}
    snaps["d"] = (idx, before["d"].index_select(0, idx))
    after = {name: w - 1e-3 * torch.randn(w.shape, generator=g).to(w.dtype) for name, w in before.items()}
    after["gone"] = torch.randn(50, generator=g)
    got = _tensor_ratios(snaps, after)
    assert set(got) == {"a", "b", "c", "d"}
    for name, vec in got.items():
        w0, w1 = before[name].double().numpy(), after[name].double().numpy()
        if name == "d":
            w0, w1 = w0[idx.numpy()], w1[idx.numpy()]
        want = [np.linalg.norm(w1 - w0), np.linalg.norm(w0)]
        assert vec.dtype == torch.float64 and vec.shape == (2,)
        np.testing.assert_allclose(vec.numpy(), want, rtol=1e-3 if name == "b" else 1e-5)


def test_update_rows_match_a_float64_reference() -> None:
    """UpdateRows: float32 weights copied back whole by one foreach copy, half and sampled ones row by row; one
    norm for every row."""
    cap = 256
    g = torch.Generator().manual_seed(8)
    weights = {
        "w": torch.randn(200, generator=g),
        "h": torch.randn(100, generator=g).half(),
        "big": torch.randn(2000, generator=g),
        "bias": torch.randn(7, generator=g),
    }
    rows = UpdateRows(cap)
    for _ in range(2):  # the rows are reused by the second step
        for name, w in weights.items():
            assert rows.take(name, w.reshape(-1))
        before = {name: w.clone() for name, w in weights.items()}
        for w in weights.values():
            w.sub_((1e-2 * torch.randn(w.shape, generator=g)).to(w.dtype))
        got = rows.ratios(weights)
        assert set(got) == set(weights)
        for name, vec in got.items():
            w0, w1 = before[name].double().numpy(), weights[name].double().numpy()
            if name == "big":
                sample = _SAMPLES.get(2000, cap, torch.device("cpu")).numpy()
                w0, w1 = w0[sample], w1[sample]
            np.testing.assert_allclose(vec.numpy(), [np.linalg.norm(w1 - w0), np.linalg.norm(w0)], rtol=1e-5)


def test_device_batch_holds_large_tensors_until_the_block_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeviceBatch.together(): a large tensor taken inside is held (not left to tensor_stats) and measured with the
    others of the block by one call when it ends, through the guard; outside, or estimating, it is not held; a
    failed measurement leaves no key behind. The kernel's stand-in is the torch device path of every element."""
    calls: list[int] = []

    def vectors(tensors: list[torch.Tensor], *, bins: int) -> torch.Tensor:
        calls.append(len(tensors))
        return torch.stack([exact_stats(t.reshape(-1), bins, t.numel(), t.numel()) for t in tensors])

    monkeypatch.setattr(fused, "fused_available", lambda device: True)
    monkeypatch.setattr(fused, "fused_vectors", vectors)
    g = torch.Generator().manual_seed(9)
    w, grad = torch.randn(40, 50, generator=g), torch.randn(40, 50, generator=g)
    grad[0, :7] = math.nan
    batch = DeviceBatch(16, 1024)
    assert batch.take("outside", w) is None
    guarded: list[str] = []

    def guard(fn: object, *args: object) -> object:
        guarded.append("called")
        return fn(*args)  # type: ignore[operator]

    with batch.together(guard):
        assert batch.take("w", w) is not None
        assert batch.take("g", grad) is not None
        assert batch.take("sampled", w, estimate=True) is not None  # a row with its sample, as without the block
        assert "w" in batch and calls == []
        w.mul_(2)  # after the block would be too late; inside it nothing runs but the hook itself
        w.div_(2)
    assert calls == [2] and guarded == ["called"]
    assert set(batch.keys()) == {"w", "g", "sampled"} and len(batch) == 3
    out = batch.finish()
    for key, x in (("w", w), ("g", grad)):
        vec, meta = out[key]
        assert not meta.estimated and meta.sample_n == x.numel()
        s = decode_tensor_stats(vec.numpy(), meta)
        a = x.double().numpy()
        fin = a[np.isfinite(a)]
        assert (s.count, s.nonfinite_count, s.min, s.max) == (fin.size, a.size - fin.size, fin.min(), fin.max())
        assert s.mean == pytest.approx(fin.mean(), rel=1e-5, abs=1e-6)  # float32 sums
    assert out["sampled"][1].estimated
    assert len(batch) == 0

    def failing(fn: object, *args: object) -> None:
        return None  # the recorder's guard once the part has failed: nothing measured

    with batch.together(failing):
        batch.take("lost", w)
    assert "lost" not in batch and len(batch) == 0
