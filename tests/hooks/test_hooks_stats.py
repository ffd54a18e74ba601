"""The statistic kernels against an independent float64 numpy reference."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actdiag.hooks.device import DeviceBatch, RowStore
from actdiag.hooks.host import HostBatch
from actdiag.hooks.sampling import SMALL_SAMPLE
from actdiag.hooks.stats import (
    StatsMeta,
    decode_many,
    decode_tensor_stats,
    saturation_count,
    tensor_stats,
    unit_activity,
)
from actdiag.records import E_LOW, ExponentHistogram, Histogram, TensorStats

PATHS = [pytest.param("host", id="host"), pytest.param("device", id="device")]


def compute(x: torch.Tensor, path: str, **kw):  # noqa: ANN202
    vec, meta = tensor_stats(x, path=path, **kw)
    return decode_tensor_stats(vec.cpu().numpy(), meta)


def reference(x: torch.Tensor) -> dict[str, float]:
    a = x.detach().to(torch.float64).numpy().ravel() if x.dtype != torch.bool else x.numpy().ravel().astype(np.float64)
    fin = a[np.isfinite(a)]
    ref = {"numel": a.size, "count": fin.size, "nonfinite": a.size - fin.size, "zeros": int((a == 0).sum())}
    if fin.size:
        ref.update(mean=fin.mean(), std=fin.std(), min=fin.min(), max=fin.max(), abs_max=np.abs(fin).max())
        ref["norm"] = float(np.sqrt((fin * fin).sum()))
    return ref


def frexp_exponents(values: np.ndarray) -> np.ndarray:
    _, e = np.frexp(values.astype(np.float32).astype(np.float64))
    return np.maximum(e, E_LOW)  # float32 subnormals share the lowest bin


def check_against_reference(x: torch.Tensor, path: str, rtol: float = 1e-5, s: TensorStats | None = None) -> None:
    s = compute(x, path) if s is None else s
    ref = reference(x)
    assert s.numel == ref["numel"]
    assert s.count == ref["count"]
    assert s.nonfinite_count == ref["nonfinite"]
    assert s.zero_count == ref["zeros"]
    if not ref["count"]:
        assert math.isnan(s.mean) and math.isnan(s.std)
        return
    scale = max(ref["abs_max"], 1e-30)
    assert s.mean == pytest.approx(ref["mean"], rel=rtol, abs=rtol * scale)
    assert s.std == pytest.approx(ref["std"], rel=10 * rtol, abs=rtol * scale)
    assert s.min == ref["min"] and s.max == ref["max"]
    assert s.abs_max == ref["abs_max"]
    assert s.norm == pytest.approx(ref["norm"], rel=10 * rtol)
    # Histograms count every finite value exactly once (no sampling below the cap).
    assert s.histogram.total == ref["count"]
    a = x.detach().to(torch.float64).numpy().ravel()
    fin = a[np.isfinite(a)]
    nz = fin[fin != 0]
    assert s.exponents.total == nz.size
    expected = np.bincount(frexp_exponents(nz) - E_LOW, minlength=len(s.exponents.counts))
    np.testing.assert_array_equal(np.asarray(s.exponents.counts), expected)
    edges = np.asarray(s.histogram.edges)
    if len(edges) > 2:
        ref_counts, _ = np.histogram(fin, bins=edges)
        diff = np.abs(np.asarray(s.histogram.counts) - ref_counts).sum()
        # float32 binning may move a value that sits within rounding of an interior edge to the next bin.
        width = edges[1] - edges[0]
        near = np.abs(fin[:, None] - edges[None, 1:-1]) <= 1e-5 * max(width, 1e-30) + 1e-6 * np.abs(fin[:, None])
        assert diff <= 2 * near.any(axis=1).sum()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.randn(1000), id="normal"),
        pytest.param(lambda: torch.randn(37, 11) * 1e-20, id="tiny"),
        pytest.param(lambda: torch.randn(64, 3) * 1e30, id="huge"),
        pytest.param(lambda: torch.relu(torch.randn(500)), id="relu-zeros"),
        pytest.param(lambda: torch.full((10,), 3.5), id="constant"),
        pytest.param(lambda: torch.tensor([2.5]), id="single"),
        pytest.param(lambda: torch.zeros(7), id="all-zero"),
        pytest.param(lambda: torch.randn(300, dtype=torch.float64) + 1e3, id="float64-offset"),
        pytest.param(lambda: torch.randn(2, 3, 4, 5), id="4d"),
        pytest.param(lambda: torch.tensor([1e-45, -1e-40, 1.0]), id="subnormal"),
        pytest.param(lambda: torch.tensor([0.0, 1.1754943508222875e-38]), id="span-at-float32-min"),
        pytest.param(lambda: torch.tensor([-3e38, 3e38, 0.0]), id="span-overflows-float32"),
    ],
)
def test_finite_tensors_match_reference(make, path: str) -> None:  # noqa: ANN001
    check_against_reference(make(), path)


@pytest.mark.parametrize("path", PATHS)
def test_nonfinite_values_are_counted_and_left_out(path: str) -> None:
    x = torch.randn(200)
    x[3] = math.nan
    x[50] = math.inf
    x[51] = -math.inf
    x[120] = 0.0
    check_against_reference(x, path)
    s = compute(x, path)
    assert s.nonfinite_count == 3 and s.count == 197


@pytest.mark.parametrize("path", PATHS)
def test_all_nonfinite_and_empty(path: str) -> None:
    for x in (torch.full((5,), math.nan), torch.tensor([math.inf, -math.inf]), torch.empty(0), torch.empty(3, 0)):
        s = compute(x, path)
        assert s.count == 0
        assert s.nonfinite_count == x.numel()
        assert math.isnan(s.mean) and math.isnan(s.std) and math.isnan(s.abs_max)
        assert s.histogram.total == 0 and s.exponents.total == 0


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_tensors(dtype: torch.dtype, path: str) -> None:
    x = torch.randint(0, 2 if dtype == torch.bool else 100, (123,)).to(dtype)
    check_against_reference(x, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_reduced_in_float32(dtype: torch.dtype, path: str) -> None:
    x = (torch.randn(4096) * 100).to(dtype)
    x[0] = 60000 if dtype == torch.float16 else 1e30
    # The reference sees exactly the half values; accumulation in float32 keeps the moments accurate.
    check_against_reference(x, path, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_large_tensor_histograms_are_sampled_but_moments_are_exact(path: str) -> None:
    x = torch.randn(300_000)
    rng_before = torch.get_rng_state()
    s = compute(x, path, sample_cap=10_000)
    assert torch.equal(torch.get_rng_state(), rng_before), "sampling must not touch the user's RNG"
    ref = reference(x)
    assert s.count == ref["count"]
    assert s.mean == pytest.approx(ref["mean"], abs=1e-5)
    assert s.std == pytest.approx(ref["std"], rel=1e-5)
    assert s.min == ref["min"] and s.max == ref["max"]
    assert s.histogram.sampled and s.exponents.sampled
    assert s.histogram.total == 10_000 and s.exponents.total == 10_000
    # A uniform sample: the share in the central bins matches the normal distribution's within sampling error.
    edges = np.asarray(s.histogram.edges)
    centre = (edges[:-1] > -1) & (edges[1:] < 1)
    share = np.asarray(s.histogram.counts)[centre].sum() / 10_000
    expected = ((x.numpy() > edges[:-1][centre][0]) & (x.numpy() < edges[1:][centre][-1])).mean()
    assert share == pytest.approx(expected, abs=0.03)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.sampled_from([0.0, -0.0, 1.0, -1.0]),
        ),
        min_size=0,
        max_size=80,
    ),
    st.sampled_from(["host", "device"]),
)
def test_random_float32_vectors(values: list[float], path: str) -> None:
    check_against_reference(torch.tensor(values, dtype=torch.float32), path, rtol=1e-4)


def test_saturation_count_matches_reference() -> None:
    y = torch.tanh(torch.randn(1000) * 3)
    got = int(saturation_count(y, -1.0, 1.0, 0.01).item())
    a = y.double().numpy()
    assert got == int((np.abs(a) >= 0.99 - 1e-7).sum()) or got == int((np.abs(a) >= 0.99).sum())


def test_unit_activity_counts_dead_rare_and_never() -> None:
    y = torch.relu(torch.randn(200, 6))
    y[:, 0] = 0  # dead
    y[:, 1] = 0
    y[0, 1] = 1.0  # active in 1 of 200 samples: rare (< 1%)
    ever = torch.zeros(6, dtype=torch.bool)
    dead, rare, never = unit_activity(y, 1, ever, 0.01).tolist()
    assert (dead, rare, never) == (1, 2, 1)
    y2 = torch.relu(torch.randn(200, 6))
    y2[:, 0] = 5.0
    y2[:, 2] = 0
    dead, rare, never = unit_activity(y2, 1, ever, 0.01).tolist()
    assert dead == 1 and never == 0  # unit 0 came alive, unit 2 was active before
    conv = torch.relu(torch.randn(4, 3, 5, 5))
    conv[:, 2] = 0
    ever_c = torch.zeros(3, dtype=torch.bool)
    assert unit_activity(conv, 1, ever_c, 0.01).tolist()[0] == 1


@pytest.mark.parametrize(
    ("shape", "unit_dim"),
    [
        pytest.param((300, 8), 1, id="linear"),
        pytest.param((3, 5, 7, 9), 1, id="conv"),
        pytest.param((4, 6, 10), 2, id="sequence"),
        pytest.param((70_000, 3), 1, id="over-65535-samples"),
        pytest.param((1, 3, 70_000), 1, id="over-65535-per-row"),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_unit_activity_matches_reference_counts(shape: tuple[int, ...], unit_dim: int, path: str) -> None:
    """Dead, rare and never-active counts against numpy int64 counts of positive outputs per unit, on every layout
    the recorder passes, including counts over 65535 (where a narrow accumulator would wrap around)."""
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    y = torch.randn(*shape, generator=g) - 2.4  # ~0.8 % positive: some units rare, small ones dead
    # Unit 0: active in its first 65636 samples (or all), a count that a uint16 accumulator would wrap to 100.
    others = [n for d, n in enumerate(shape) if d != unit_dim]
    k = min(65_636, math.prod(others))
    where = list(np.unravel_index(np.arange(k), others))
    where.insert(unit_dim, np.zeros(k, dtype=np.intp))
    y.numpy()[tuple(where)] = 1.0
    y.select(unit_dim, shape[unit_dim] - 1).zero_()  # the last unit: dead
    ever = torch.zeros(shape[unit_dim], dtype=torch.bool)
    ever[1] = True  # active in an earlier call
    before = ever.numpy().copy()
    a = y.double().numpy()
    active = (np.moveaxis(a, unit_dim, -1) > 0).reshape(-1, shape[unit_dim]).sum(axis=0, dtype=np.int64)
    samples = a.size // shape[unit_dim]
    got = unit_activity(y, unit_dim, ever, 0.01, path=path).tolist()
    assert got == [(active == 0).sum(), (active < 0.01 * samples).sum(), (~(before | (active > 0))).sum()]
    np.testing.assert_array_equal(ever.numpy(), before | (active > 0))  # updated in place


# ---------------------------------------------------------------------------------------------- exact=False
def sample_of(x: torch.Tensor, cap: int) -> np.ndarray:
    """The elements the estimated path samples, found independently: the recorded sample index is the only shared
    part (it is what the statistic is defined over); everything computed from it here is float64 numpy."""
    from actdiag.hooks.stats import _SAMPLES

    idx = _SAMPLES.get(x.numel(), cap, x.device).cpu().numpy()
    return x.detach().reshape(-1).to(torch.float64).numpy()[idx]


ESTIMABLE = [
    pytest.param(lambda: torch.randn(300_000) * 3 + 1, id="normal"),
    pytest.param(lambda: torch.relu(torch.randn(512, 640)), id="relu-zeros"),
    pytest.param(lambda: torch.randn(100_000, dtype=torch.float64) * 1e-20, id="float64-tiny"),
    pytest.param(lambda: torch.randn(70_000) * 1e30, id="huge"),
    pytest.param(lambda: torch.randn(70_000) * 1e-36, id="float32-tiny"),  # bins in the scaled space
]


def check_estimate(x: torch.Tensor, s: TensorStats, cap: int) -> None:
    """`s`, estimated from x's sample of `cap` elements, against a float64 reference over x and that sample."""
    ref, smp = reference(x), sample_of(x, cap)
    assert s.estimated == ("std", "zero_fraction", "histogram") and s.histogram.sampled
    # Exact, from every element (CONTRACT.md, "Exactness"): count, mean, extremes.
    assert s.count == ref["count"] and s.nonfinite_count == 0
    assert s.mean == pytest.approx(ref["mean"], rel=1e-5, abs=1e-6 * ref["abs_max"])
    assert s.min == ref["min"] and s.max == ref["max"] and s.abs_max == ref["abs_max"]
    # Estimated: the spread about that mean (as summed in float32: where the mean dominates, its rounding would
    # swamp the comparison) and the zeros of the sample.
    assert s.std == pytest.approx(np.sqrt(((smp - s.mean) ** 2).mean()), rel=1e-5)
    assert s.zero_count == round((smp == 0).sum() * x.numel() / cap)
    assert s.histogram.total == cap
    nz = smp[smp != 0]
    expected = np.bincount(frexp_exponents(nz) - E_LOW, minlength=len(s.exponents.counts))
    np.testing.assert_array_equal(np.asarray(s.exponents.counts), expected)
    if s.max > s.min:
        ref_counts, _ = np.histogram(smp, bins=np.asarray(s.histogram.edges))
        assert np.abs(np.asarray(s.histogram.counts) - ref_counts).sum() <= 2
    else:  # a constant tensor: one bin holding the whole sample
        assert s.histogram.counts == (cap,)
    # And the estimates are close to the whole tensor's (a uniform sample of `cap` elements).
    assert s.std == pytest.approx(ref["std"], rel=0.05, abs=1e-30)
    assert s.zero_fraction == pytest.approx(ref["zeros"] / ref["numel"], abs=0.03)


@pytest.mark.parametrize("make", ESTIMABLE)
def test_estimated_stats_match_float64_reference_on_their_sample(make) -> None:  # noqa: ANN001
    x = make()
    vec, meta = tensor_stats(x, sample_cap=5000, exact=False)
    assert meta.estimated
    check_estimate(x, decode_tensor_stats(vec.numpy(), meta), 5000)


def take_change_and_finish(batch: HostBatch, cases: dict[str, torch.Tensor], estimate: bool = False) -> dict:
    """Take every case into the batch, change cases["normal"] in place afterwards (as an in-place ReLU or the
    optimizer would: the batch must have kept what it needs when it took the tensor), finish and decode. `cases` is
    left holding the values as they were taken."""
    for key, x in cases.items():
        assert batch.take(key, x, estimate) is not None, key
    before = cases["normal"].clone()
    cases["normal"].mul_(0)
    cases["normal"] = before
    out = batch.finish()
    assert set(out) == set(cases) and len(batch) == 0
    return {key: decode_tensor_stats(np.asarray(vec), meta) for key, (vec, meta) in out.items()}


def test_step_batch_estimates_large_tensors_like_the_per_tensor_path() -> None:
    """With estimate=True the batch takes large float32 tensors (the one pass and a copy of the sample in take(), the
    rest for all of them at once in finish()): each result matches the float64 reference on its sample and equals
    what the tensor gets measured alone. Non-finite and float64 tensors are left to the per-tensor path."""
    cap = 5000
    cases = {p.id: p.values[0]() for p in ESTIMABLE if p.id != "float64-tiny"}
    cases["constant"] = torch.full((20_000,), -2.5)
    cases["mean-dominates"] = 1000 + torch.randn(40_000) * 1e-2
    batch = HostBatch(bins=64, sample_cap=cap)
    assert batch.take("no-estimate", cases["normal"]) is None  # estimate=False: large tensors are not taken
    with_nan = torch.randn(50_000)
    with_nan[77] = math.nan
    assert batch.take("nan", with_nan, estimate=True) is None
    assert batch.take("float64", torch.randn(50_000, dtype=torch.float64), estimate=True) is None
    batch.take("dropped", torch.randn(30_000), estimate=True)
    batch.discard("dropped")  # a row taken and then given up (its key re-measured elsewhere) is left out
    for key, got in take_change_and_finish(batch, cases, estimate=True).items():
        x = cases[key]
        check_estimate(x, got, cap)
        alone = compute(x, path="host", sample_cap=cap, exact=False)
        assert (got.count, got.mean, got.min, got.max, got.zero_count) == (
            alone.count, alone.mean, alone.min, alone.max, alone.zero_count,
        ), key  # fmt: skip
        assert got.m2 == pytest.approx(alone.m2, rel=1e-12), key
        assert (got.histogram, got.exponents) == (alone.histogram, alone.exponents), key


def test_estimated_mode_is_exact_for_small_tensors_and_nonfinite_ones() -> None:
    small = torch.randn(4000)
    vec, meta = tensor_stats(small, sample_cap=5000, exact=False)
    assert not meta.estimated
    check_against_reference(small, path="host")
    # One NaN among 300k elements: the pass over every element sees it and the exact path counts it.
    x = torch.randn(300_000)
    x[123_457] = math.nan
    x[7] = math.inf
    vec, meta = tensor_stats(x, sample_cap=5000, exact=False)
    s = decode_tensor_stats(vec.numpy(), meta)
    ref = reference(x)
    assert not s.estimated
    assert s.nonfinite_count == 2 and s.count == ref["count"]
    assert s.min == ref["min"] and s.max == ref["max"]
    assert s.std == pytest.approx(ref["std"], rel=1e-5)


def test_estimated_sum_overflow_falls_back_to_exact() -> None:
    # Finite values whose float32 sum overflows: the one pass reads Inf, and the exact path takes over.
    x = torch.full((100_000,), 3e38)
    x[::2] = -3e38
    vec, meta = tensor_stats(x, sample_cap=5000, exact=False)
    s = decode_tensor_stats(vec.numpy(), meta)
    assert not s.estimated and s.nonfinite_count == 0
    assert s.min == pytest.approx(-3e38) and s.max == pytest.approx(3e38)


@pytest.mark.parametrize(
    "make",
    [*ESTIMABLE, pytest.param(lambda: (torch.randn(300_000) * 3 + 1).bfloat16(), id="bfloat16")],
)
def test_device_path_estimates_like_the_cpu_path(make) -> None:  # noqa: ANN001
    # The device path (CUDA's; path="device" runs it on the CPU) with exact=False: count and mean from every
    # element, the rest from the same sample as the CPU path.
    x = make()
    vec, meta = tensor_stats(x, sample_cap=5000, exact=False, path="device")
    assert meta.estimated
    check_estimate(x, decode_tensor_stats(vec.numpy(), meta), 5000)


def test_device_path_estimate_keeps_count_and_mean_exact_with_nonfinite_values() -> None:
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(8)) * 2 + 0.5
    x[::1000] = math.nan  # 300 NaN, some of them in the sample
    x[7], x[11] = math.inf, -math.inf
    vec, meta = tensor_stats(x, sample_cap=5000, exact=False, path="device")
    s = decode_tensor_stats(vec.numpy(), meta)
    ref, smp = reference(x), sample_of(x, 5000)
    fin = smp[np.isfinite(smp)]
    assert 0 < fin.size < smp.size, "the sample holds both kinds"
    assert s.estimated and s.count == ref["count"] and s.nonfinite_count == 302
    assert s.mean == pytest.approx(ref["mean"], rel=1e-5, abs=1e-6 * ref["abs_max"])
    assert s.min == ref["min"] and s.max == ref["max"]  # exact: from every finite element
    assert s.std == pytest.approx(np.sqrt(((fin - s.mean) ** 2).mean()), rel=1e-5)
    assert s.histogram.total == fin.size
    assert s.std == pytest.approx(ref["std"], rel=0.05)


def test_device_path_estimate_edge_cases() -> None:
    from actdiag.hooks.stats import _SAMPLES

    n, cap = 100_000, 5000
    # All NaN: no finite value anywhere.
    s = decode_tensor_stats(*_vec_meta(torch.full((n,), math.nan), cap))
    assert s.count == 0 and s.nonfinite_count == n and math.isnan(s.mean) and math.isnan(s.std)
    # One finite value, outside the sample: its count, mean and extremes are still exact.
    idx = set(_SAMPLES.get(n, cap, torch.device("cpu")).tolist())
    lone = next(i for i in range(n) if i not in idx)
    x = torch.full((n,), math.nan)
    x[lone] = 2.5
    s = decode_tensor_stats(*_vec_meta(x, cap))
    assert (s.count, s.mean, s.min, s.max, s.std, s.zero_count) == (1, 2.5, 2.5, 2.5, 0.0, 0)
    assert s.histogram.total == 0
    # Finite values whose float32 sum overflows: the mean falls back on the sample's, still finite.
    x = torch.full((n,), 3e38)
    x[::2] = -3e38
    s = decode_tensor_stats(*_vec_meta(x, cap))
    smp = sample_of(x, cap)
    assert s.count == n and s.nonfinite_count == 0
    assert s.mean == pytest.approx(smp.mean(), rel=1e-6, abs=1e30) and math.isfinite(s.std)
    assert s.min == pytest.approx(-3e38) and s.max == pytest.approx(3e38)


def _vec_meta(x: torch.Tensor, cap: int) -> tuple[np.ndarray, StatsMeta]:
    vec, meta = tensor_stats(x, sample_cap=cap, exact=False, path="device")
    assert meta.estimated
    return vec.numpy(), meta


# ---------------------------------------------------------------------------------------------- HostBatch
def test_small_batch_matches_float64_reference_and_the_per_tensor_path() -> None:
    """The step's small tensors measured together (segment reductions, one bincount) give what each measured alone
    gives, and both match float64 numpy; non-finite ones go the per-tensor way."""
    g = torch.Generator().manual_seed(3)
    cases = {
        "normal": torch.randn(1000, generator=g),
        "relu-zeros": torch.relu(torch.randn(37, 11, generator=g)),
        "constant": torch.full((10,), 3.5),
        "single": torch.tensor([2.5]),
        "all-zero": torch.zeros(7),
        "subnormal": torch.tensor([1e-45, -1e-40, 1.0]),
        "huge": torch.randn(64, 3, generator=g) * 1e30,
        "span-overflows-float32": torch.tensor([-3e38, 3e38, 0.0]),
        "layernorm-ones": torch.ones(256) + torch.randn(256, generator=g) * 1e-3,
        "float16": (torch.randn(300, generator=g) * 100).half(),
        "bfloat16": torch.randn(300, generator=g).bfloat16(),
        "nan-inf": torch.tensor([1.0, math.nan, 2.0, -math.inf, 0.0]),
        "at-the-cap": torch.randn(1024, generator=g),
    }
    batch = HostBatch(bins=64, sample_cap=1024)
    assert batch.take("too-big", torch.randn(1025)) is None
    assert batch.take("float64", torch.randn(10, dtype=torch.float64)) is None  # float64: the per-tensor path
    for key, got in take_change_and_finish(batch, cases).items():
        x = cases[key]
        check_against_reference(x, path="host", s=got)
        alone = compute(x, path="host")
        assert (got.count, got.zero_count, got.min, got.max) == (alone.count, alone.zero_count, alone.min, alone.max)
        assert got.exponents.counts == alone.exponents.counts


def test_small_batch_rows_of_one_size_match_float64_reference() -> None:
    """Tensors of one size share a buffer and are reduced along its rows together: each row whatever its neighbours
    hold (magnitudes whose squares need scaling, ones left to the float64 way, NaN, zeros), a row given up in the
    middle, and every tensor changed in place after it was taken, match float64 numpy."""
    g = torch.Generator().manual_seed(5)
    shape = (16, 8)
    cases = {
        "normal": torch.randn(shape, generator=g),
        "mean-dominates": 1000 + torch.randn(shape, generator=g) * 1e-2,
        "relu-zeros": torch.relu(torch.randn(shape, generator=g)),
        "vanishing-gradient": torch.randn(shape, generator=g) * 1e-20,  # squares scaled before they are summed
        "exploding": torch.randn(shape, generator=g) * 1e20,
        "below-float32-pass": torch.randn(shape, generator=g) * 1e-33,  # divided by a power of two first
        "above-float32-pass": torch.randn(shape, generator=g) * 1e35,
        "subnormals": (torch.randn(shape, generator=g) * 1e-41).index_fill_(0, torch.tensor([2]), 0.0),
        "huge-beside-tiny": torch.randn(shape, generator=g).index_fill_(1, torch.tensor([0]), 1e36) * 1e-10,
        "all-zero": torch.zeros(shape),
        "constant": torch.full(shape, -0.75),
        "nan": torch.randn(shape, generator=g).index_fill_(1, torch.tensor([3]), math.nan),
        "float16": (torch.randn(shape, generator=g) * 100).half(),
    }
    batch = HostBatch(bins=64, sample_cap=1024)
    for i, (key, x) in enumerate(cases.items()):
        assert batch.take(key, x) is not None
        if i == 3:
            assert batch.take("dropped", torch.randn(shape, generator=g)) is not None
            batch.discard("dropped")  # a gap among the rows of this size
    before = {key: x.clone() for key, x in cases.items()}
    for x in cases.values():
        x.mul_(-3)  # as an in-place op after the hook (ReLU(inplace=True), the optimizer) would
    out = batch.finish()
    assert set(out) == set(cases)
    for key, (vec, meta) in out.items():
        check_against_reference(before[key], path="host", s=decode_tensor_stats(np.asarray(vec), meta))


def test_small_batch_estimates_from_the_small_sample_when_allowed() -> None:
    """Estimating, small tensors over SMALL_SAMPLE elements keep count, mean and extremes from every element and take
    the spread, the zeros and both histograms from their fixed sample of SMALL_SAMPLE elements, against a float64
    reference over the tensor and that sample, whatever their neighbours in the size's rows hold; smaller ones and
    rows with a non-finite value stay exact."""
    g = torch.Generator().manual_seed(8)
    shape = (32, 128)  # 4096 elements, under the sample cap, over SMALL_SAMPLE
    cases = {
        "normal": torch.randn(shape, generator=g) * 3 + 1,
        "relu-zeros": torch.relu(torch.randn(shape, generator=g)),
        "mean-dominates": 1000 + torch.randn(shape, generator=g) * 1e-2,
        "vanishing-gradient": torch.randn(shape, generator=g) * 1e-30,  # scaled by a power of two first
        "exploding": torch.randn(shape, generator=g) * 1e30,
        "constant": torch.full(shape, -0.75),
        "float16": (torch.randn(shape, generator=g) * 100).half(),
    }
    exact_cases = {
        "nan": torch.randn(shape, generator=g).index_fill_(1, torch.tensor([3]), math.nan),
        "under-the-sample": torch.randn(SMALL_SAMPLE, generator=g),
    }
    batch = HostBatch(bins=64, sample_cap=8192, small_sample=SMALL_SAMPLE)
    for key, x in {**cases, **exact_cases}.items():
        meta = batch.take(key, x)
        assert meta is not None and meta.estimated is (x.numel() > SMALL_SAMPLE), key
    before = {key: x.clone() for key, x in {**cases, **exact_cases}.items()}
    for x in before.values():
        x.mul_(-3)  # changed in place after the hook: the batch measures its copies
    out = {key: decode_tensor_stats(np.asarray(vec), meta) for key, (vec, meta) in batch.finish().items()}
    assert set(out) == set(before)
    for key, x in cases.items():
        check_estimate(x.float() if x.dtype == torch.float16 else x, out[key], SMALL_SAMPLE)
    for key, x in exact_cases.items():
        assert out[key].estimated == (), key
        check_against_reference(x, path="host", s=out[key])


@pytest.mark.parametrize("order", ["A B A", "A B A C", "B A B A", "A A"])
def test_small_batch_key_taken_again_keeps_its_latest_copy(order: str) -> None:
    """A key taken again (a gradient re-read after clipping) is measured from its latest copy, whichever rows the
    other keys of its size hold; `take_many` copies several tensors of one size at once, like `take` for each."""
    g = torch.Generator().manual_seed(11)
    batch = HostBatch(bins=16, sample_cap=1024)
    latest: dict[str, torch.Tensor] = {}
    for i, key in enumerate(order.split()):
        x = torch.randn(6, 5, generator=g) * (i + 1) + i
        if i % 2:
            assert batch.take(key, x) is not None
        else:
            assert batch.take_many([key, f"{key}-twin"], [x, -x]) is not None
            latest[f"{key}-twin"] = -x.clone()
        latest[key] = x.clone()
    out = batch.finish()
    assert set(out) == set(latest)
    for key, (vec, meta) in out.items():
        check_against_reference(latest[key], path="host", s=decode_tensor_stats(np.asarray(vec), meta))


@pytest.mark.parametrize("shapes", ["same", "mixed", "transposed"])
def test_take_many_copies_each_tensor_flattened_whatever_its_shape(shapes: str) -> None:
    """`take_many` copies tensors of one size that share a shape in their shape, others flattened one by one;
    either way each row holds its tensor's elements in order (parameters that require grad included)."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.nn.Parameter(torch.randn(6, 5, generator=g)) for _ in range(3)]
    if shapes == "mixed":
        xs[1] = torch.nn.Parameter(torch.randn(30, generator=g))
    elif shapes == "transposed":
        xs = [torch.randn(5, 6, generator=g).t() for _ in range(3)]  # non-contiguous, one shape
    batch = HostBatch(bins=16, sample_cap=1024)
    kept = batch.take_many(["a", "b", "c"], xs)
    assert kept is not None
    rows, start = kept
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(rows.rows[start + i], x.detach().reshape(-1).numpy())


SMALL_CASES = {
    "normal": lambda g: torch.randn(1000, generator=g),
    "relu-zeros": lambda g: torch.relu(torch.randn(37, 11, generator=g)),
    "constant": lambda g: torch.full((10,), 3.5),
    "single": lambda g: torch.tensor([2.5]),
    "all-zero": lambda g: torch.zeros(7),
    "subnormal": lambda g: torch.tensor([1e-45, -1e-40, 1.0]),
    "huge": lambda g: torch.randn(64, 3, generator=g) * 1e30,
    "span-overflows-float32": lambda g: torch.tensor([-3e38, 3e38, 0.0]),
    "layernorm-ones": lambda g: torch.ones(256) + torch.randn(256, generator=g) * 1e-3,
    "float16": lambda g: (torch.randn(300, generator=g) * 100).half(),
    "bfloat16": lambda g: torch.randn(300, generator=g).bfloat16(),
    "nan-inf": lambda g: torch.tensor([1.0, math.nan, 2.0, -math.inf, 0.0]),
    "all-nan": lambda g: torch.full((9,), math.nan),
    "at-the-cap": lambda g: torch.randn(1024, generator=g),
}


def test_device_batch_is_exact_for_small_tensors_like_the_masked_path() -> None:
    """The device path's batch (CUDA's; run here on the CPU): small tensors, NaN and Inf included, measured as rows
    of one buffer match float64 numpy and what the masked path gives each alone; leftovers of an earlier step's
    longer tensor in a row do not leak into a shorter one."""
    g = torch.Generator().manual_seed(3)
    batch = DeviceBatch(bins=64, sample_cap=1024)
    assert batch.take("too-big", torch.randn(1025)) is None  # large: only with estimate=True
    assert batch.take("float64", torch.randn(10, dtype=torch.float64)) is None  # float64: the per-tensor path
    long_first = {key: torch.randn(1024, generator=g) for key in SMALL_CASES}  # fills every row to the cap
    take_change_and_finish(batch, {**long_first, "normal": torch.randn(1000, generator=g)})
    cases = {key: make(g) for key, make in SMALL_CASES.items()}
    for key, got in take_change_and_finish(batch, cases).items():
        x = cases[key]
        check_against_reference(x, path="device", s=got)
        alone = compute(x, path="device")
        assert (got.count, got.zero_count, got.min, got.max) == (alone.count, alone.zero_count, alone.min, alone.max)
        assert got.mean == pytest.approx(alone.mean, rel=1e-6, nan_ok=True), key
        assert got.exponents.counts == alone.exponents.counts, key


def test_row_store_keeps_its_rows_when_it_grows_and_resets_them_when_cleared() -> None:
    store = RowStore((4, torch.float32, math.nan), (1, torch.int64, 7))
    for k in range(40):  # past the first allocation (16 rows) twice
        assert store.next_row(torch.device("cpu")) == k
        store.buffers[0][k, :2] = k
        store.buffers[1][k, 0] = -k
    rows, ints = store.in_use()
    assert rows.shape == (40, 4) and store.buffers[0].shape[0] >= 40
    np.testing.assert_array_equal(rows[:, :2].numpy(), np.repeat(np.arange(40.0), 2).reshape(40, 2))
    assert torch.isnan(rows[:, 2:]).all() and ints[:, 0].tolist() == [-k for k in range(40)]
    store.clear()
    assert store.used == 0 and torch.isnan(store.buffers[0]).all() and (store.buffers[1] == 7).all()
    store.release()
    assert store.buffers == [] and store.device is None


def test_device_batch_estimates_large_tensors_like_the_device_path() -> None:
    """estimate=True: large tensors' count, non-finite count and mean from every element in take(), the rest from
    their rows in finish(), as `tensor_stats(..., exact=False)` on the device path gives each alone."""
    cap = 5000
    cases = {p.id: p.values[0]() for p in ESTIMABLE if p.id != "float64-tiny"}
    cases["constant"] = torch.full((20_000,), -2.5)
    with_nan = torch.randn(50_000, generator=torch.Generator().manual_seed(4))
    with_nan[::500] = math.nan
    with_nan[3] = -math.inf
    cases["nan-inf"] = with_nan
    batch = DeviceBatch(bins=64, sample_cap=cap)
    assert batch.take("no-estimate", cases["normal"]) is None
    assert batch.take("float64", torch.randn(50_000, dtype=torch.float64), estimate=True) is None
    batch.take("dropped", torch.randn(30_000), estimate=True)
    batch.discard("dropped")  # a row taken and then given up is measured but not returned
    for key, got in take_change_and_finish(batch, cases, estimate=True).items():
        x = cases[key]
        alone = compute(x, path="device", sample_cap=cap, exact=False)
        assert got.estimated and alone.estimated, key
        assert (got.numel, got.count, got.min, got.max, got.zero_count) == (
            alone.numel, alone.count, alone.min, alone.max, alone.zero_count,
        ), key  # fmt: skip
        assert got.mean == pytest.approx(alone.mean, rel=1e-6), key
        assert got.m2 == pytest.approx(alone.m2, rel=1e-5), key
        assert (got.histogram, got.exponents) == (alone.histogram, alone.exponents), key
        if key != "nan-inf":
            check_estimate(x, got, cap)
    assert len(batch) == 0 and batch.take("again", cases["normal"], estimate=True) is not None


def test_decoded_histograms_read_late_behave_like_tuples() -> None:
    """decode_many leaves each histogram's counts in the step's arrays until read (records._Counts): reading,
    comparing, hashing, pickling and the totals give what a histogram built from tuples gives, and nothing can be
    set on one."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(5))
    vec, meta = tensor_stats(x)
    first, second = decode_many([vec.numpy()] * 2, [meta] * 2)
    h, e = first.histogram, first.exponents
    assert h._block is not None and e._block is not None
    assert h.total == e.total == 3000  # from the array, before reading
    assert h == second.histogram and hash(e) == hash(second.exponents)  # compared as values (this reads both)
    eager_h = Histogram(edges=list(h.edges), counts=list(h.counts), sampled=h.sampled)
    eager_e = ExponentHistogram(counts=list(e.counts), sampled=e.sampled)
    assert h._block is None and (h, e) == (eager_h, eager_e) and hash(h) == hash(eager_h)
    assert isinstance(h.counts, tuple) and all(type(c) is int for c in h.counts)
    assert len(h.edges) == len(h.counts) + 1 and h.edges[0] == first.min and h.edges[-1] == first.max
    third = decode_many([vec.numpy()], [meta])[0]
    assert pickle.loads(pickle.dumps(third.histogram)) == eager_h  # pickled as values, not the step's arrays
    assert repr(third.exponents) == repr(eager_e)
    for obj in (h, third.exponents):
        with pytest.raises(AttributeError):
            obj.sampled = True
    assert h != eager_e and Histogram((0.0, 1.0), (1,)) != Histogram((0.0, 2.0), (1,))


def test_decoded_stats_behave_like_stats_built_from_histograms() -> None:
    """A decoded TensorStats builds its histograms from its step's arrays when they are read
    (records._StepHistograms); as a dataclass it is the same as one built from Histogram objects: fields, equality,
    hash, repr, pickling, copying and dataclasses.replace. Covers the usual, constant and empty tensors."""
    cases = [
        torch.randn(3000, generator=torch.Generator().manual_seed(6)),
        torch.full((40,), 2.5),
        torch.full((8,), math.nan),
    ]
    vecs, metas = zip(*(tensor_stats(x) for x in cases), strict=True)
    decoded = decode_many([v.numpy() for v in vecs], list(metas))
    for got in decoded:
        h, e = got.histogram, got.exponents
        eager = TensorStats(
            **{
                f.name: getattr(got, f.name)
                for f in dataclasses.fields(TensorStats)
                if f.name not in ("histogram", "exponents")
            },
            histogram=Histogram(edges=list(h.edges), counts=list(h.counts), sampled=h.sampled),
            exponents=ExponentHistogram(counts=list(e.counts), sampled=e.sampled),
        )
        assert got == eager and hash(got) == hash(eager) and repr(got) == repr(eager)
        assert pickle.dumps(got) == pickle.dumps(eager)
        # repr: an empty tensor's NaN fields compare unequal once they are new float objects
        assert repr(pickle.loads(pickle.dumps(got))) == repr(copy.deepcopy(got)) == repr(eager)
        if got.count:
            assert pickle.loads(pickle.dumps(got)) == eager and copy.deepcopy(got) == eager
        assert [f.name for f in dataclasses.fields(got)] == [f.name for f in dataclasses.fields(eager)]
        moved = dataclasses.replace(got, mean=1.0)
        assert moved.histogram == eager.histogram and moved.exponents == eager.exponents and moved.mean == 1.0
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.histogram = eager.histogram  # type: ignore[misc]
    assert decoded[1].histogram.edges == (2.0, 3.0) and decoded[1].histogram.counts == (40,)
    assert decoded[2].histogram == Histogram((0.0, 1.0), (0,)) and decoded[2].exponents.total == 0


def test_small_batch_with_opposite_infinities_warns_nothing() -> None:
    """Inf + -Inf in a small tensor's finiteness check is NaN; numpy's "invalid value" warning must not reach the
    user's training loop, and the tensor goes the per-tensor way, which counts both."""
    batch = HostBatch(bins=16, sample_cap=1024)
    assert batch.take("k", torch.tensor([math.inf, -math.inf, 1.0, 3.0])) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ((vec, meta),) = batch.finish().values()
    s = decode_tensor_stats(np.asarray(vec), meta)
    assert (s.count, s.nonfinite_count, s.mean, s.min, s.max) == (2, 2, 2.0, 1.0, 3.0)
