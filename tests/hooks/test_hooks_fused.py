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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from actdiag.hooks import fused
from actdiag.hooks.layout import STATS

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
