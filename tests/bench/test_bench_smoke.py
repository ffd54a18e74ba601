"""The benchmark scripts run end to end in their smoke mode, so they cannot rot. Nothing here measures speed."""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their sibling _common
    spec = importlib.util.spec_from_file_location(f"actdiag_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_step() -> ModuleType:
    return load("bench_step")


def test_step_benchmark_writes_a_row_for_every_model_and_variant(bench_step: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "BENCH.md"
    out.write_text("# Benchmarks\n\nintro kept\n")
    bench_step.main(["--smoke", "--write", str(out)])
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nintro kept\n"), "the rest of the file is kept"
    assert text.count("<!-- bench:steps -->") == 1 and "<!-- /bench:steps -->" in text
    for model in bench_step.MODELS:
        for variant in bench_step.VARIANTS:
            row = f"| {model} / {variant} |"
            if variant == "wandb" and "wandb skipped" in text:
                assert row not in text
                continue
            assert row in text, f"missing row {row!r}"
    assert "torch " in text and "CPU:" in text, "the machine and versions are recorded"
    assert text.count("<!-- bench:targets -->") == 1 and "| every=1: extra time <= 2x the floor's" in text
    # Running again replaces the section instead of appending a second one.
    bench_step.main(["--smoke", "--models", "mlp", "--variants", "none", "--write", str(out)])
    text = out.read_text()
    assert text.count("<!-- bench:steps -->") == 1
    assert "| cnn / none |" not in text and "| mlp / none |" in text


def test_step_benchmark_runs_the_extra_models_on_request(bench_step: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "BENCH.md"
    bench_step.main(["--smoke", "--models", ",".join(bench_step.EXTRA_MODELS), "--variants", "none,actdiag-every1",
                     "--write", str(out)])  # fmt: skip
    text = out.read_text()
    for model in bench_step.EXTRA_MODELS:
        assert f"| {model} / none |" in text and f"| {model} / actdiag-every1 |" in text
    assert "| mlp / none |" not in text, "the default models run only when asked for"


def test_step_benchmark_rejects_unknown_names(bench_step: ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        bench_step.main(["--smoke", "--models", "mlp", "--variants", "nope"])
    with pytest.raises(ValueError, match="unknown model"):
        bench_step.main(["--smoke", "--models", "nope", "--variants", "none"])


def test_reports_benchmark_writes_its_table(tmp_path: Path) -> None:
    bench_reports = load("bench_reports")
    out = tmp_path / "BENCH.md"
    bench_reports.main(["--smoke", "--write", str(out)])
    text = out.read_text()
    assert text.count("<!-- bench:reports -->") == 1
    for row in ("| history (Monitor.step", "| TensorBoard: writer thread", "| HTML report", "| JSON report"):
        assert row in text, f"missing row {row!r}"
    for command in ("--version", "--help", "inspect --help"):
        assert f"`python -m actdiag {command}`" in text


def test_kernel_benchmark_times_every_case() -> None:
    bench_kernel = load("bench_kernel")
    lines = bench_kernel.main(["--smoke", "--threads", "1"])
    text = "\n".join(lines)
    for name in bench_kernel.cases(smoke=True):
        assert f"| {name} |" in text


def test_op_count_covers_every_model_and_interval(tmp_path: Path) -> None:
    count_ops = load("count_ops")
    out = tmp_path / "BENCH.md"
    lines = count_ops.main(["--smoke", "--write", str(out)])
    text = out.read_text()
    assert text.count("<!-- bench:ops -->") == 1 and "\n".join(lines) in text
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "every=" in line]
    assert [(r[0].split(":")[0], r[3]) for r in rows] == [
        (f"| {m}", f"every={e}") for m in ("mlp", "cnn", "gpt", "deep") for e in (1, 50)
    ]
    for r in rows:
        ops, tensors = int(r[4].split(" ")[0]), int(r[2])
        assert ops > 0 and tensors > 0, r


def test_profile_accounts_for_every_part() -> None:
    profile_step = load("profile_step")
    lines = profile_step.main(["--smoke", "--model", "mlp"])
    text = "\n".join(lines)
    for label, *_ in profile_step.PARTS:
        assert f"| {label} |" in text, f"missing part {label!r}"
    # The hooks ran under the timers (registered after wrapping): the forward hooks were called, once per layer.
    row = next(line for line in lines if line.startswith("| forward hooks"))
    assert int(row.split("|")[3]) == 4, row  # the smoke MLP: 2 x (Linear + ReLU)
    # Every function is unwrapped again afterwards.
    from actdiag.hooks import recorder

    assert recorder.Recorder._record_output.__qualname__ == "Recorder._record_output"


def test_profile_ablation_times_every_copy_and_restores_the_stand_ins() -> None:
    profile_step = load("profile_step")
    from actdiag import history
    from actdiag.hooks import host, recorder
    from actdiag.hooks.layout import STATS

    real = (host._estimate_rows, host.HostBatch._take_large, recorder.tensor_stats, recorder.unit_activity)
    real_records = (recorder.decode_step, history.HistoryBuffer.add)
    lines = profile_step.main(["--smoke", "--model", "mlp", "--ablate"])
    text = "\n".join(lines)
    for name in profile_step.ABLATIONS:
        assert f"| {name} |" in text, f"missing copy {name!r}"
    assert (host._estimate_rows, host.HostBatch._take_large, recorder.tensor_stats, recorder.unit_activity) == real
    assert (recorder.decode_step, history.HistoryBuffer.add) == real_records
    # The stand-in keeps the vectors' layout: count and mean from the one pass.
    n, mean, lo = np.array([5.0, 7.0]), np.array([0.5, 2.0]), np.array([-1.0, 0.0])
    rows = profile_step._head_only(np.zeros((2, 8), np.float32), n, mean, lo, lo + 3, 64)
    assert rows.shape == (2, STATS.length(64)) and rows[:, STATS.COUNT].tolist() == [5, 7]
    assert rows[1, STATS.MEAN] == 2.0 and rows[0, STATS.MAX] == 2.0
    # ... and takes what the host batch passes it (small tensors estimated from their sample at every=1), which the
    # smoke models' tensors are too small to reach.
    small = np.random.default_rng(0).standard_normal((3, 2048)).astype(np.float32)
    real_estimate = host._estimate_rows
    host._estimate_rows = profile_step._head_only
    try:
        vecs, odd, _ = host._rows_estimated(small, 1024, 64, host.SizeRows(2048))
    finally:
        host._estimate_rows = real_estimate
    assert odd.size == 0 and vecs[:, STATS.COUNT].tolist() == [2048.0] * 3


def test_step_benchmark_fixed_malloc_is_said(tmp_path: Path) -> None:
    # In a process of its own: mallopt changes the allocator of the whole process for good.
    out = subprocess.run(
        [sys.executable, str(BENCH / "bench_step.py"), "--smoke", "--models", "mlp", "--variants", "none",
         "--malloc-fixed"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    if platform.libc_ver()[0] == "glibc":
        assert "- allocator: glibc mmap and trim thresholds fixed at 32 MiB (mallopt)" in out
    else:
        assert "- allocator: --malloc-fixed asked for, but mallopt is not available here" in out
    assert "page faults / step" in out


def test_ab_step_times_both_versions_side_by_side() -> None:
    root = Path(__file__).resolve().parents[2]
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: the baseline comes out of git")
    ab_step = load("ab_step")
    import torch._dynamo  # recorders take torch.compile's force-eager stance only once dynamo is imported

    lines = ab_step.main(["--smoke", "--model", "mlp", "--baseline", "HEAD"])
    # Both versions' watches shared one count of the stance, so it is given back (a stuck stance breaks torch.compile).
    assert torch._dynamo.eval_frame._stance.stance == "default"
    text = "\n".join(lines)
    for copy in ("none", "none-copy", "HEAD", "this checkout"):
        assert f"| {copy} |" in text, f"missing copy {copy!r}"
    # The baseline is its own package, taken out of git: none of its modules is the checkout's.
    baseline = {name: m for name, m in sys.modules.items() if name.split(".")[0] == ab_step.BASELINE}
    assert "actdiag_baseline.hooks.recorder" in baseline
    checkout = root / "actdiag"
    assert all(checkout not in Path(m.__file__).parents for m in baseline.values() if getattr(m, "__file__", None))


def test_ab_step_sample_cap_applies_to_the_checkout_only(monkeypatch: pytest.MonkeyPatch) -> None:
    root = Path(__file__).resolve().parents[2]
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: the baseline comes out of git")
    ab_step = load("ab_step")
    import actdiag

    caps: list[int] = []
    real = actdiag.watch

    def spy(model: Any, **kwargs: Any) -> Any:
        monitor = real(model, **kwargs)
        caps.append(monitor.recorder.sample_cap)
        return monitor

    monkeypatch.setattr(ab_step.actdiag, "watch", spy)
    lines = ab_step.main(["--smoke", "--model", "mlp", "--baseline", "HEAD", "--sample-cap", "64"])
    assert caps == [64]  # the checkout's watch only; the baseline's own package kept its default
    assert "| this checkout, sample_cap=64 |" in "\n".join(lines)


def test_gc_benchmark_counts_a_recorded_steps_survivors() -> None:
    lines = load("gc_step").main(["--smoke"])
    # 4 x (Linear + ReLU) calls; their records (and TensorStats) are built only when read (decode.decode_step)
    assert "survivors of one recorded step: " in lines[1] and "LayerCall 8" in lines[1]
    assert "TensorStats" not in lines[1] and "Histogram" not in lines[1] and "4 recorded" in lines[2]


@pytest.mark.parametrize(
    ("ours", "actdiag"), [("stats-only", "actdiag-every1"), ("stats-only-exact", "actdiag-default")]
)
def test_stats_only_measures_what_actdiag_measures(
    bench_step: ModuleType, tmp_path: Path, ours: str, actdiag: str
) -> None:
    """The stats-only variants are the statistics of actdiag's recorded step (every=1, or the default interval's
    exact path) without the bookkeeping: the same tensors and the same vectors."""
    import torch

    from actdiag.hooks import host

    results: dict[str, Any] = {}
    real_finish = host.HostBatch.finish

    def spy(self: Any) -> Any:
        out = real_finish(self)
        results.setdefault("vecs", []).append(out)
        return out

    for name in (ours, actdiag):
        # Full size: its tensors of 2048 and 4096 elements are over SMALL_SAMPLE, so every=1 estimates them and the
        # default interval does not (a variant with the other's statistics would fail here).
        load = bench_step.workload("deep", smoke=False)
        torch.manual_seed(0)
        model = load.build()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: both see the same weights
        variant = bench_step.make_variant(name)
        variant.attach(model, tmp_path)
        results["vecs"] = []
        host.HostBatch.finish = spy  # type: ignore[method-assign]
        try:
            loss = bench_step.train_step(model, opt, load)
            variant.after_step(loss)
        finally:
            host.HostBatch.finish = real_finish  # type: ignore[method-assign]
        results[name] = (variant.tensors(), [v for out in results["vecs"] for v in out.values()])
        variant.close()
    n_ours, vecs_ours = results[ours]
    n_actdiag, vecs_actdiag = results[actdiag]
    assert n_ours == n_actdiag > 0
    # Every tensor of the model is small: both hand all of them to the host batch, with the same sizes.
    assert sorted(meta.numel for _, meta in vecs_ours) == sorted(meta.numel for _, meta in vecs_actdiag)
    # The same tensors give the same vectors (statistics and histograms): the same pass computes them.
    assert sorted(vec.tobytes() for vec, _ in vecs_ours) == sorted(vec.tobytes() for vec, _ in vecs_actdiag)
