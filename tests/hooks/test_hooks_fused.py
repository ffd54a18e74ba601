"""The fused Triton kernel (actdiag.hooks.fused) against a float64 numpy reference.

Without a GPU the kernels run in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1) before triton
is first imported, and then stays on for the whole process. So the checks below run in one child process started by
the `interpreted` fixture (a few seconds), and each test asserts that its check passed there: the rest of the suite
never sees the interpreter. On a GPU the same checks run in this process on CUDA tensors, compiled
(`test_every_check_on_cuda`). triton is a test dependency: without it the child fails, and so do these tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from actdiag.hooks import fused
from actdiag.hooks.device import DeviceBatch
from actdiag.hooks.layout import STATS, decode_tensor_stats
from actdiag.hooks.recorder import Recorder
from actdiag.hooks.stats import tensor_stats
from actdiag.records import StepRecord, TensorStats

ROOT = Path(__file__).resolve().parents[2]
BINS = fused.DEFAULT_BINS
FIELDS = [f.name for f in dataclasses.fields(fused.FusedStats) if f.name != "vectors"]


# ---------------------------------------------------------------------------------------------------- reference
def reference(x: torch.Tensor, bins: int = BINS) -> dict[str, object]:
    """Every statistic of `x` in float64 numpy, written from the definitions (not from the kernels)."""
    a = x.detach().reshape(-1).to(torch.float64).cpu().numpy()  # float32, float16 and bfloat16 are exact in float64
    fin = a[np.isfinite(a)]
    out: dict[str, object] = {"count": fin.size, "nonfinite": a.size - fin.size, "zero_count": int((a == 0).sum())}
    if fin.size:
        mean = fin.mean()
        out.update(mean=mean, m2=float(((fin - mean) ** 2).sum()), min=fin.min(), max=fin.max())
    else:
        out.update(mean=0.0, m2=0.0, min=math.inf, max=-math.inf)
    nz = fin[fin != 0].astype(np.float32)
    out["exp"] = np.bincount((nz.view(np.int32) >> 23) & 0xFF, minlength=fin_exp_bins()).astype(np.float64)
    # Linear bins between min and max; values within 1e-4 of a bin edge may land on either side of it in float32.
    if fin.size and fin.max() > fin.min():
        pos = (fin - fin.min()) / (fin.max() - fin.min()) * bins
        out["lin"] = np.bincount(np.clip(np.floor(pos), 0, bins - 1).astype(np.int64), minlength=bins)
        near = np.abs(pos - np.rint(pos)) < 1e-4
        out["edge"] = int((near & (np.rint(pos) > 0) & (np.rint(pos) < bins)).sum())
    else:
        out["lin"] = np.bincount(np.zeros(fin.size, dtype=np.int64), minlength=bins)
        out["edge"] = 0
    return out


def fin_exp_bins() -> int:
    return fused.N_EXP


def assert_matches(got: fused.FusedStats, k: int, x: torch.Tensor, bins: int = BINS) -> None:
    ref = reference(x, bins)
    row = {name: getattr(got, name)[k].detach().cpu().numpy() for name in FIELDS}
    assert row["count"] == ref["count"] and row["nonfinite"] == ref["nonfinite"]
    assert row["zero_count"] == ref["zero_count"]
    assert row["min"] == ref["min"] and row["max"] == ref["max"]  # exact: they are values of the tensor
    n = max(int(ref["count"]), 1)  # type: ignore[call-overload]
    std = math.sqrt(float(ref["m2"]) / n)  # type: ignore[arg-type]
    # The mean to float32's rounding of the spread, not of the mean: a large mean must cost no precision.
    assert abs(float(row["mean"]) - float(ref["mean"])) <= 1e-6 * std + 1e-12 * abs(float(ref["mean"]))  # type: ignore[arg-type]
    assert float(row["m2"]) == pytest.approx(float(ref["m2"]), rel=1e-5, abs=1e-300)  # type: ignore[arg-type]
    np.testing.assert_array_equal(row["exp"], ref["exp"])
    lin, want = row["lin"], np.asarray(ref["lin"])
    assert lin.sum() == want.sum() == ref["count"]
    assert np.abs(lin - want).sum() <= 2 * int(ref["edge"])  # type: ignore[call-overload]


def assert_decoded_matches(got: TensorStats, x: torch.Tensor, bins: int = BINS) -> None:
    """A decoded `TensorStats` of `x`, its histograms from every element, against the float64 reference."""
    ref = reference(x, bins)
    assert (got.numel, got.count, got.nonfinite_count) == (x.numel(), ref["count"], ref["nonfinite"])
    assert got.zero_count == ref["zero_count"] and not got.estimated and not got.histogram.sampled
    if not got.count:  # no finite value: the record says NaN (records.TensorStats)
        assert math.isnan(got.min) and math.isnan(got.max) and math.isnan(got.mean)
        assert sum(got.histogram.counts) == sum(got.exponents.counts) == 0
        return
    assert (got.min, got.max) == (ref["min"], ref["max"])
    std = math.sqrt(float(ref["m2"]) / max(int(ref["count"]), 1))  # type: ignore[call-overload, arg-type]
    assert abs(got.mean - float(ref["mean"])) <= 1e-6 * std + 1e-12 * abs(float(ref["mean"]))  # type: ignore[arg-type]
    assert got.m2 == pytest.approx(float(ref["m2"]), rel=1e-5, abs=1e-300)  # type: ignore[arg-type]
    np.testing.assert_array_equal(np.asarray(got.exponents.counts), ref["exp"])
    lin = np.asarray(got.histogram.counts)
    assert lin.sum() == ref["count"]
    if got.count and got.max > got.min:
        assert np.abs(lin - np.asarray(ref["lin"])).sum() <= 2 * int(ref["edge"])  # type: ignore[call-overload]
    else:  # constant, or without a finite value: one bin (records.Histogram)
        assert lin.size == 1


def assert_same_exact_fields(a: TensorStats, b: TensorStats) -> None:
    """Two paths' statistics of one tensor: the fields exact on every path agree."""
    assert (a.numel, a.count, a.nonfinite_count, a.zero_count, a.min, a.max) == (
        b.numel, b.count, b.nonfinite_count, b.zero_count, b.min, b.max,
    )  # fmt: skip
    if a.count:
        assert a.mean == pytest.approx(b.mean, rel=1e-6, abs=1e-7 * a.abs_max)
        assert a.std == pytest.approx(b.std, rel=1e-4, abs=1e-7 * a.abs_max)


@contextmanager
def fused_switch(value: str) -> Iterator[list[str]]:
    """ACTDIAG_FUSED=`value` for the block; yields the fused kernels' launches (their names) made in it."""
    launches: list[str] = []
    real, before = fused._launch, os.environ.get(fused.ENV_SWITCH)

    def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        launches.append(getattr(kernel, "__name__", str(kernel)))
        real(kernel, grid, *args, **kwargs)

    os.environ[fused.ENV_SWITCH] = value
    fused._launch = launch
    try:
        yield launches
    finally:
        fused._launch = real
        if before is None:
            del os.environ[fused.ENV_SWITCH]
        else:
            os.environ[fused.ENV_SWITCH] = before


def record_step(
    device: str, switch: str, exact: bool, cap: int
) -> tuple[StepRecord, dict[str, torch.Tensor], list[str]]:
    """One recorded step of a small model on the device path (an exact zero in its input), with ACTDIAG_FUSED=`switch`:
    the record, every measured tensor by name (outputs, their gradients, weights, weight gradients) and the fused
    kernels' launches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 200), nn.Tanh(), nn.Linear(200, 3)).to(device)
    x = torch.randn(16, 32, generator=_gen(11))
    x[0, :5] = 0.0  # a NaN would make every weight gradient NaN; tensor_stats' and DeviceBatch's checks have them
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            seen[f"{name}.act"] = out.detach().clone()
            out.register_hook(lambda g: seen.__setitem__(f"{name}.grad", g.detach().clone()))

        return hook

    for name, module in model.named_children():
        module.register_forward_hook(keep(name))
    rec = Recorder(model, path="device", sample_cap=cap, exact=exact)
    with fused_switch(switch) as launches:
        rec.begin(0)
        model(x.to(device)).sum().backward()
        got = rec.end()
    assert got is not None
    for pname, p in model.named_parameters():
        seen[f"{pname}.weight"], seen[f"{pname}.wgrad"] = p.detach().clone(), p.grad.detach().clone()  # type: ignore[union-attr]
    return got, seen, launches


def measured(record: StepRecord) -> dict[str, TensorStats | None]:
    out: dict[str, TensorStats | None] = {}
    for layer in record.layers:
        out[f"{layer.name}.act"], out[f"{layer.name}.grad"] = layer.activation, layer.gradient
    for p in record.params:
        out[f"{p.name}.weight"], out[f"{p.name}.wgrad"] = p.weight, p.grad
    return out


# ---------------------------------------------------------------------------------------------------- checks
def _load_bench(name: str) -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


# Each check takes the device to run on. Sizes stay small: the interpreter runs a 1024-element block in milliseconds.
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_random_batch_of_mixed_sizes(device: str) -> None:
    g = _gen(0)
    sizes = [1, 7, 100, 1000, 5000, 0, 3 * fused.CHUNK + 17]  # the last one spans several programs
    xs = [(torch.randn(n, generator=g) * 2 - 0.5).to(device) for n in sizes]
    got = fused.fused_stats(xs)
    for k, x in enumerate(xs):
        assert_matches(got, k, x)
    ten = fused.fused_stats(xs[2:5], bins=10)  # another bin count moves the exponent bins and the last column
    assert ten.vectors.shape == (3, STATS.length(10))
    for k, x in enumerate(xs[2:5]):
        assert_matches(ten, k, x, bins=10)


def check_tensors_beyond_max_programs(device: str) -> None:
    """A tensor over MAX_PROGRAMS x CHUNK elements keeps MAX_PROGRAMS programs, each reading a longer span."""
    g = _gen(9)
    before = fused.MAX_PROGRAMS
    fused.MAX_PROGRAMS = 2
    try:
        n = 5 * fused.CHUNK + 3
        assert fused.programs(n) == 2 and fused.program_span(n) % fused.BLOCK == 0
        xs = [(torch.randn(n, generator=g) * 5 + 20).to(device), torch.randn(10, generator=g).to(device)]
        got = fused.fused_stats(xs)
        for k, x in enumerate(xs):
            assert_matches(got, k, x)
    finally:
        fused.MAX_PROGRAMS = before


def check_large_mean(device: str) -> None:
    g = _gen(1)
    xs = [(torch.randn(3000, generator=g) + shift).to(device) for shift in (1e4, -3e6, 1e7)]
    got = fused.fused_stats(xs)
    for k, x in enumerate(xs):
        assert_matches(got, k, x)


def check_nan_inf_and_zeros(device: str) -> None:
    g = _gen(2)
    x = torch.randn(2500, generator=g)
    x[::97] = math.nan
    x[5] = math.inf
    x[6] = -math.inf
    x[10:40] = 0.0
    x[41] = -0.0
    got = fused.fused_stats([x.to(device)])
    assert_matches(got, 0, x)
    assert got.count[0] + got.nonfinite[0] == x.numel()


def check_without_finite_values(device: str) -> None:
    xs = [torch.full((300,), math.nan), torch.tensor([math.inf, -math.inf, math.nan]), torch.empty(0)]
    got = fused.fused_stats([x.to(device) for x in xs])
    for k, x in enumerate(xs):
        assert_matches(got, k, x)
    assert got.min.tolist() == [math.inf] * 3 and got.max.tolist() == [-math.inf] * 3
    assert got.count.tolist() == [0.0] * 3 and got.nonfinite.tolist() == [300.0, 3.0, 0.0]


def check_constant_and_extreme_magnitudes(device: str) -> None:
    g = _gen(3)
    xs = [
        torch.full((500,), 2.5),  # constant: every value in linear bin 0
        torch.randn(800, generator=g) * 1e30,  # squares beyond float32: the block's power of two keeps them in range
        torch.randn(800, generator=g) * 1e-30,
        torch.randn(800, generator=g) * 1e-40,  # float32 subnormals: exponent bin 0
        torch.tensor([3.0e38, -3.0e38, 1.0]),
    ]
    got = fused.fused_stats([x.to(device) for x in xs])
    for k, x in enumerate(xs):
        assert_matches(got, k, x)
    assert got.lin[0, 0] == 500 and got.exp[3, 0] > 0


def check_half_precision(device: str) -> None:
    g = _gen(4)
    xs = [
        (torch.randn(2000, generator=g) * 3 + 100).to(torch.float16),
        (torch.randn(2000, generator=g) * 3 + 100).to(torch.bfloat16),
        torch.tensor([65504.0, -65504.0, 6e-8, math.inf, math.nan, 0.0], dtype=torch.float16),
        (torch.randn(333, generator=g)).to(torch.bfloat16),
        torch.randn(50, generator=g),  # a float32 one in the same call: one set of launches per dtype
    ]
    got = fused.fused_stats([x.to(device) for x in xs])
    for k, x in enumerate(xs):
        assert_matches(got, k, x)


def check_non_contiguous(device: str) -> None:
    g = _gen(5)
    base = torch.randn(64, 90, generator=g).to(device)
    xs = [base.t(), base[:, ::3], base[5:40:2, 7:], base.expand(2, 64, 90)]
    assert not any(x.is_contiguous() for x in xs)
    got = fused.fused_stats(xs)
    for k, x in enumerate(xs):
        assert_matches(got, k, x)


def check_rows_of_one_buffer(device: str) -> None:
    """A step's small tensors copied into rows of one buffer (as the device path keeps them): each row's leading
    elements a tensor; the batch's table is cached, and a second call with new values gives their statistics."""
    g = _gen(6)
    buf = torch.randn(5, 256, generator=g).to(device)
    sizes = [256, 100, 1, 17, 0]
    views = [buf[k, :n] for k, n in enumerate(sizes)]
    first = fused.fused_stats(views)
    for k, x in enumerate(views):
        assert_matches(first, k, x)
    buf.mul_(-3).add_(1)
    second = fused.fused_stats(views)
    for k, x in enumerate(views):
        assert_matches(second, k, x)


def check_a_pair_of_allocations_keeps_one_table(device: str) -> None:
    """Two tensors of their own allocations (a weight and its gradient, as DeviceBatch.together measures them): new
    addresses at every call, one cached table (the last tensor's offset is the kernels' argument), the reference's
    statistics each time, either way round in memory."""
    g = _gen(13)
    plans = len(fused._PLANS)
    for step in range(3):
        keep = [torch.empty(step * 4099 + 1, device=device) for _ in range(step)]  # other addresses each time
        w = (torch.randn(3000, generator=g) * 0.5 + step).to(device)
        grad = torch.randn(40, 70, generator=g).to(device)
        grad[3, ::7] = math.nan
        pair = [w, grad] if step % 2 else [grad, w]
        got = fused.fused_stats(pair)
        for k, x in enumerate(pair):
            assert_matches(got, k, x)
        del keep
    assert len(fused._PLANS) - plans <= 2  # one table per order of the two sizes


def check_vectors_follow_the_stats_layout(device: str) -> None:
    """`vectors` is the layout of stats.tensor_stats: its masked path (the device path's) gives the same row."""
    from actdiag.hooks.stats import tensor_stats

    g = _gen(7)
    xs = [torch.randn(3000, generator=g) * 0.1 + 0.3, torch.tensor([0.0, -1.0, 2.0, math.nan, 0.0, 5.0])]
    vecs = fused.fused_vectors([x.to(device) for x in xs]).cpu()
    for k, x in enumerate(xs):
        want, meta = tensor_stats(x, path="device", sample_cap=x.numel())
        assert vecs[k].shape == (meta.length,)
        torch.testing.assert_close(vecs[k, :6], want[:6], rtol=1e-5, atol=1e-6)
        assert torch.equal(vecs[k, 6:], want[6:])  # both histograms, bin for bin


def check_bench_fused_script(device: str) -> None:
    """bench/bench_fused.py (bench/gpu_check.sh runs it on a GPU) works: its smoke cases, timed on `device`."""
    lines = _load_bench("bench_fused").main(["--smoke", "--device", device])
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| case")]
    assert len(rows) == 2 and all(float(r.split(" | ")[2]) > 0 for r in rows), rows


def check_bad_input(device: str) -> None:
    with pytest.raises(TypeError, match="float64"):
        fused.fused_stats([torch.zeros(3, dtype=torch.float64, device=device)])
    with pytest.raises(ValueError, match="at least one tensor"):
        fused.fused_stats([])
    with pytest.raises(ValueError, match="bins"):
        fused.fused_stats([torch.zeros(3, device=device)], bins=0)


def check_tensor_stats_device_path_takes_the_kernel(device: str) -> None:
    """tensor_stats(path="device") on its exact path: the kernel's three launches, every element in the histograms
    (a tensor over the sample cap is not sampled), the float64 reference's statistics; the torch device path gives
    the same exact fields (ACTDIAG_FUSED=0: no launch). float64, and the estimated path, stay with torch."""
    g, cap = _gen(10), 1024
    holes = torch.randn(3000, generator=g)
    holes[::50], holes[3], holes[4], holes[10:20] = math.nan, math.inf, -math.inf, 0.0
    xs = [
        holes,
        (torch.randn(40, 300, generator=g) * 3 + 1).t(),  # non-contiguous, over the cap
        torch.randn(5000, generator=g).half(),
        (torch.randn(700, generator=g) * 1e3).bfloat16(),
    ]
    kernels = ["moments_kernel", "combine_kernel", "linear_kernel"]
    for x in xs:
        with fused_switch("1") as launches:
            vec, meta = tensor_stats(x.to(device), path="device", sample_cap=cap)
        assert launches == kernels and (meta.sample_n, meta.estimated) == (x.numel(), False)
        got = decode_tensor_stats(vec.cpu().numpy(), meta)
        assert_decoded_matches(got, x)
        with fused_switch("0") as launches:
            tvec, tmeta = tensor_stats(x.to(device), path="device", sample_cap=cap)
        assert launches == [] and tmeta.sampled == (x.numel() > cap)
        torch_got = decode_tensor_stats(tvec.cpu().numpy(), tmeta)
        assert_same_exact_fields(got, torch_got)
        if x.numel() <= cap:
            assert got.histogram.counts == torch_got.histogram.counts
            assert got.exponents.counts == torch_got.exponents.counts
    with fused_switch("1") as launches:
        tensor_stats(torch.randn(50, dtype=torch.float64).to(device), path="device")
        _, meta = tensor_stats(xs[1].to(device), path="device", sample_cap=cap, exact=False)
    assert launches == [] and meta.estimated


def check_device_batch_takes_the_kernel(device: str) -> None:
    """DeviceBatch.finish: one call of the kernel for the kept rows (a discarded one left out), the same vectors
    as the torch rows' path and the reference; a large tensor's sample among the rows keeps the torch path."""
    g = _gen(12)
    xs = [torch.randn(n, generator=g) * 2 + 1 for n in (1, 17, 256, 1000)]
    xs[2][::9] = math.nan
    xs.append(torch.randn(300, generator=g).half())
    for switch in ("1", "0"):
        batch = DeviceBatch(BINS, 1024)
        for step in range(2):  # rows at the same offsets: the second step reuses the first's table
            for k, x in enumerate(xs):
                assert batch.take(k, x.to(device)) is not None
            batch.take("gone", torch.randn(30, generator=g).to(device))
            batch.discard("gone")
            with fused_switch(switch) as launches:
                out = batch.finish()
            assert launches == (["moments_kernel", "combine_kernel", "linear_kernel"] if switch == "1" else [])
            assert sorted(out, key=str) == list(range(len(xs)))
            for k, x in enumerate(xs):
                vec, meta = out[k]
                assert_decoded_matches(decode_tensor_stats(vec.cpu().numpy(), meta), x)
            assert len(batch) == 0, step
    batch = DeviceBatch(BINS, 1024)
    batch.take("small", xs[1].to(device), estimate=True)
    batch.take("large", torch.randn(5000, generator=g).to(device), estimate=True)
    with fused_switch("1") as launches:
        out = batch.finish()
    assert launches == [] and out["large"][1].estimated
    assert_decoded_matches(decode_tensor_stats(out["small"][0].cpu().numpy(), out["small"][1]), xs[1])


def check_recorded_step_takes_the_kernel(device: str) -> None:
    """A recorded step on the device path with ACTDIAG_FUSED=1: every measured tensor (the step's batch of small
    ones, the large ones alone, a large weight with its gradient) from the kernel, equal to the float64 reference
    with nothing sampled, and its exact fields equal to the torch path's (ACTDIAG_FUSED=0). Estimating
    (exact=False), the batch holds large rows and the step stays on the torch path."""
    cap = 1024
    got, seen, launches = record_step(device, "1", exact=True, cap=cap)
    stats = measured(got)
    assert set(stats) == set(seen)
    large = [name for name, t in seen.items() if t.numel() > cap]
    assert len(large) >= 4, "large tensors are among them"
    # The batch's three; three per large output or output gradient; three per large parameter, for its weight and
    # its gradient together (measured in one hook: DeviceBatch.together).
    alone = [name for name in large if name.endswith((".act", ".grad"))]
    params = [name for name in large if name.endswith(".weight")]
    assert {f"{name[: -len('.weight')]}.wgrad" for name in params} <= set(large)
    assert len(launches) == 3 * (1 + len(alone) + len(params))
    assert len(launches) < 3 * (1 + len(large))
    for name, x in seen.items():
        s = stats[name]
        assert s is not None, name
        assert_decoded_matches(s, x)
    plain, _, none = record_step(device, "0", exact=True, cap=cap)
    assert none == []
    for name, s in measured(plain).items():
        assert s is not None and stats[name] is not None
        assert_same_exact_fields(stats[name], s)  # type: ignore[arg-type]
        assert s.histogram.sampled == (name in large)
    estimated, _, launches = record_step(device, "1", exact=False, cap=cap)
    torch_estimated, _, _ = record_step(device, "0", exact=False, cap=cap)
    assert launches == []
    assert measured(estimated) == measured(torch_estimated)


CHECKS: dict[str, Callable[[str], None]] = {
    name[len("check_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")
}


# ---------------------------------------------------------------------------------------------------- tests
def _child_main() -> None:
    """Run every check on CPU tensors (in Triton's interpreter) and print {name: "ok" or the traceback} as JSON."""
    results: dict[str, str] = {}
    for name, check in CHECKS.items():
        try:
            check("cpu")
            results[name] = "ok"
        except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
            results[name] = traceback.format_exc()
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"the interpreted checks did not run:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.parametrize("name", list(CHECKS))
def test_interpreted_on_cpu(interpreted: dict[str, str], name: str) -> None:
    assert interpreted[name] == "ok", interpreted[name]


def test_selection_by_device_and_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fused.ENV_SWITCH, raising=False)
    assert not fused.fused_available("cpu")
    assert fused.fused_available("cuda") == (fused._triton() is not None)
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    assert fused.fused_available("cpu")
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    assert not fused.fused_available("cuda")
    assert fused.fused_supported(torch.zeros(1, dtype=torch.bfloat16))
    assert not fused.fused_supported(torch.zeros(1, dtype=torch.float64))


def test_the_torch_path_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """ACTDIAG_FUSED=0, or the CPU without the switch: the device path measures with torch, never the kernel; and the
    host path never takes it, even with ACTDIAG_FUSED=1."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the fused kernel was launched")

    monkeypatch.setattr(fused, "_launch", refuse)
    x = torch.randn(3000, generator=_gen(13))
    x[7] = math.nan
    for switch in ("0", None):
        if switch is None:
            monkeypatch.delenv(fused.ENV_SWITCH, raising=False)
        else:
            monkeypatch.setenv(fused.ENV_SWITCH, switch)
        vec, meta = tensor_stats(x, path="device", sample_cap=x.numel())
        assert_decoded_matches(decode_tensor_stats(vec.numpy(), meta), x)
        batch = DeviceBatch(BINS, 4096)
        batch.take("x", x)
        vec, meta = batch.finish()["x"]
        assert_decoded_matches(decode_tensor_stats(vec.numpy(), meta), x)
    monkeypatch.setenv(fused.ENV_SWITCH, "1")
    model = nn.Sequential(nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 2))
    rec = Recorder(model, sample_cap=64)  # the host path (CPU tensors); a NaN sends its tensors to torch's ops
    rec.begin(0)
    inp = torch.randn(4, 8)
    inp[0, 0] = math.nan
    model(inp).sum().backward()
    got = rec.end()
    assert got is not None and got.layers[0].activation is not None
    assert got.layers[0].activation.nonfinite_count == 300


def test_importing_and_recording_on_cpu_never_import_triton() -> None:
    """The default CPU path, and the device path on CPU tensors without ACTDIAG_FUSED, never import triton (a
    child process: this one may have imported it already)."""
    code = """
import sys, torch, actdiag
from torch import nn
from actdiag.hooks.recorder import Recorder
model = nn.Sequential(nn.Linear(4, 30), nn.ReLU())
with actdiag.watch(model, every=1) as monitor:
    model(torch.randn(2, 4)).sum().backward()
    monitor.step()
rec = Recorder(model, path="device")
rec.begin(0)
model(torch.randn(2, 4)).sum().backward()
assert rec.end() is not None and monitor.latest is not None
print("TRITON", "triton" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k not in (fused.ENV_SWITCH, "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "TRITON False" in proc.stdout, proc.stdout


def test_triton_is_installed_for_the_tests() -> None:
    """The `test` extra installs triton (a CPU wheel runs the interpreter): without it these tests must fail."""
    assert fused._triton() is not None, "pip install triton (the gpu and test extras)"


def test_launches_per_call_are_three_whatever_the_batch() -> None:
    """The issue's target is at most 4 launches per measured tensor: 3 for a tensor alone, 3 for a whole batch of
    one dtype (the kernels are counted, not run: the count is decided on the host), and no ATen op that launches a
    kernel besides the copy of a non-contiguous tensor."""
    count_ops = _load_bench("count_ops")
    g = _gen(8)

    def calls(xs: list[torch.Tensor]) -> tuple[int, list[str]]:
        with count_ops._fused_launches(run=False) as launches:
            fused.fused_stats(xs)  # the batch's table planned (cached from then on)
            launches.clear()
            ops = count_ops.launched(lambda: fused.fused_stats(xs))
        return ops, list(launches)

    kernels = ["moments_kernel", "combine_kernel", "linear_kernel"]
    assert calls([torch.randn(5000, generator=g)]) == (0, kernels)
    assert calls([torch.randn(n, generator=g) for n in (1, 64, 3000, 3 * fused.CHUNK)]) == (0, kernels)
    assert calls([torch.randn(8, generator=g), torch.randn(8, generator=g).half()]) == (0, kernels * 2)
    assert calls([torch.randn(30, 40, generator=g).t()]) == (1, kernels)  # the contiguous copy
    assert calls([torch.empty(0), torch.empty(0)]) == (0, ["combine_kernel"])


def test_count_ops_reports_the_fused_launches(tmp_path: Path) -> None:
    out = tmp_path / "BENCH.md"
    lines = _load_bench("count_ops").main(["--fused", "--smoke", "--models", "mlp", "--write", str(out)])
    assert out.read_text().count("<!-- bench:ops-fused -->") == 1
    row = next(line for line in lines if line.startswith("| mlp")).split(" | ")
    tensors, (ops, launches) = int(row[2]), map(int, row[5].split(" + "))
    assert tensors > 0 and ops == 0 and launches == 3 * tensors and row[6] == "3.00"
    # The recorder itself with the kernel: the smoke MLP's tensors are all small, one call of its device batch.
    assert row[12].split(" (")[0].endswith(" + 3")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CHECKS))
def test_every_check_on_cuda(name: str) -> None:
    CHECKS[name]("cuda")


@pytest.mark.gpu
def test_no_host_synchronisation_on_cuda() -> None:
    xs = [torch.randn(n, device="cuda") for n in (10, 5000, 3 * fused.CHUNK)]
    fused.fused_stats(xs)  # compiles the kernels, caches the batch's table
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = fused.fused_stats(xs)
        other = fused.fused_stats([torch.randn(777, device="cuda")])  # a new table: copied from pinned memory
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for k, x in enumerate(xs):
        assert_matches(got, k, x)
    assert other.count[0].item() == 777


if __name__ == "__main__":
    _child_main()
