"""TensorBoard output read back by TensorBoard's own EventAccumulator: tags of shared/CONTRACT.md section 5, values
against a float64 numpy reference of the tensors the model really produced, the layout and the findings table."""

from __future__ import annotations

import json
import re
import threading
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn

import actdiag
from actdiag.reports.tensorboard import (
    BLOB_SCHEMA,
    FINDINGS_TAG,
    LAYERS_PER_CHART,
    PLUGIN_NAME,
    PROFILE_TAG,
    REPORT_TAG,
    TensorBoardSink,
    custom_scalars_layout,
    findings_markdown,
)

from .conftest import XSS_NAME, DeepNet, hand_findings


def _load(logdir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


class Probe(nn.Module):
    """Linear -> ReLU with 5 of 16 units forced dead (bias -100) -> Linear -> Tanh driven into saturation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 8)
        self.tanh = nn.Tanh()
        with torch.no_grad():
            self.fc1.bias[:5] = -100.0
            self.fc2.weight.mul_(20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tanh(self.fc2(self.relu(self.fc1(x))))


def _capture(model: nn.Module) -> tuple[dict[str, np.ndarray], list[object]]:
    """Outputs of each named module as float64 numpy arrays: the independent reference."""
    seen: dict[str, np.ndarray] = {}
    handles = [
        m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.detach().double().numpy()))
        for n, m in model.named_children()
    ]
    return seen, handles


def test_reports_tensorboard_inspect_tags_and_values(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Probe()
    x = torch.randn(64, 8)
    w0 = model.fc1.weight.detach().double().numpy().copy()
    seen, handles = _capture(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = actdiag.inspect(model, x, logdir=str(tmp_path), optimizer=opt)
    for h in handles:
        h.remove()
    w1 = model.fc1.weight.detach().double().numpy()
    ea = _load(tmp_path)
    tags = ea.Tags()
    names = ["fc1", "relu", "fc2", "tanh"]
    for n in names:
        assert f"activations/{n}" in tags["histograms"]
        assert f"gradients/{n}" in tags["histograms"]
        assert f"act_std/{n}" in tags["scalars"]
        assert f"grad_norm/{n}" in tags["scalars"]
    for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        assert f"weights/{p}" in tags["histograms"]
        assert f"weight_grads/{p}" in tags["histograms"]
    assert "dead_fraction/relu" in tags["scalars"] and "dead_fraction/fc1" not in tags["scalars"]
    assert "saturation/tanh" in tags["scalars"] and "saturation/relu" not in tags["scalars"]
    assert "update_ratio/fc1" in tags["scalars"] and "update_ratio/relu" not in tags["scalars"]
    assert {"custom_scalars__config__", FINDINGS_TAG} <= set(tags["tensors"])

    def scalar(tag: str) -> float:
        (event,) = ea.Scalars(tag)
        assert event.step == 0
        return float(event.value)

    for n in names:
        assert scalar(f"act_std/{n}") == pytest.approx(np.std(seen[n]), rel=1e-5)
    relu_out = seen["relu"]
    assert scalar("dead_fraction/relu") == pytest.approx(np.mean((relu_out > 0).sum(axis=0) == 0))
    assert scalar("dead_fraction/relu") >= 5 / 16
    assert scalar("saturation/tanh") == pytest.approx(np.mean(np.abs(seen["tanh"]) >= 0.99))
    assert scalar("saturation/tanh") > 0.1
    assert scalar("update_ratio/fc1") == pytest.approx(np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rel=1e-4)

    # Histograms: TensorBoard's buckets hold every value of the (small) tensor, between its min and max.
    (hist,) = ea.Histograms("activations/fc2")
    h = hist.histogram_value
    ref = seen["fc2"].ravel()
    assert h.num == ref.size and sum(h.bucket) == ref.size
    assert h.min == pytest.approx(ref.min(), rel=1e-6) and h.max == pytest.approx(ref.max(), rel=1e-6)
    assert h.bucket_limit[-1] == pytest.approx(ref.max(), rel=1e-6)
    assert h.sum == pytest.approx(ref.sum(), rel=1e-4, abs=1e-4)
    assert h.sum_squares == pytest.approx(np.dot(ref, ref), rel=1e-5)
    # Counts per bucket against numpy on the same edges.
    edges = np.concatenate([[h.min], np.asarray(h.bucket_limit)])
    ref_counts, _ = np.histogram(ref, bins=edges)
    assert np.abs(np.asarray(h.bucket) - ref_counts).sum() <= 2  # float32 vs float64 at the bin edges
    (wh,) = ea.Histograms("weights/fc1.weight")
    assert wh.histogram_value.num == w0.size
    assert wh.histogram_value.min == pytest.approx(w0.min(), rel=1e-6)

    # One run: one event file straight in the logdir, no sub-run folders.
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert report.layers


def test_reports_tensorboard_profile_and_weight_norms(tmp_path: Path) -> None:
    """actdiag's own summaries: the depth profile of the step (values against numpy), under the plugin name
    `actdiag`, and the weight norm of every parameter as a scalar."""
    torch.manual_seed(2)
    model = Probe()
    x = torch.randn(64, 8)
    weights = {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}
    seen, handles = _capture(model)
    grads: dict[str, np.ndarray] = {}

    def keep_grad(name: str) -> object:
        def hook(mod: nn.Module, inputs: object, out: torch.Tensor) -> None:
            out.register_hook(lambda g: grads.__setitem__(name, g.double().numpy()))

        return hook

    handles += [m.register_forward_hook(keep_grad(n)) for n, m in model.named_children()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    actdiag.inspect(model, x, logdir=str(tmp_path), optimizer=opt)
    for h in handles:
        h.remove()
    ea = _load(tmp_path)

    for name, w in weights.items():  # measured before the optimizer step, as the weight histograms are
        (event,) = ea.Scalars(f"weight_norm/{name}")
        assert event.step == 0 and event.value == pytest.approx(np.linalg.norm(w), rel=1e-5)

    (prof,) = ea.Tensors(PROFILE_TAG)
    assert prof.step == 0
    meta = ea.SummaryMetadata(PROFILE_TAG)
    assert meta.plugin_data.plugin_name == PLUGIN_NAME
    blob = json.loads(prof.tensor_proto.string_val[0].decode())
    assert blob["schema"] == BLOB_SCHEMA and blob["step"] == 0
    rows = {row["layer"]: row for row in blob["layers"]}
    assert list(rows) == ["fc1", "relu", "fc2", "tanh"]  # depth order
    for n, row in rows.items():
        out, g = seen[n], grads[n]
        assert row["act_std"] == pytest.approx(np.std(out), rel=1e-5)
        assert row["act_mean"] == pytest.approx(np.mean(out), rel=1e-4, abs=1e-6)
        assert row["act_abs_max"] == pytest.approx(np.abs(out).max(), rel=1e-6)
        assert row["grad_rms"] == pytest.approx(np.sqrt(np.mean(g * g)), rel=1e-4)
        assert row["act_nonfinite"] == 0 and row["grad_nonfinite"] == 0
    assert rows["relu"]["dead_fraction"] == pytest.approx(np.mean((seen["relu"] > 0).sum(axis=0) == 0))
    assert rows["relu"]["dead_fraction"] >= 5 / 16 and rows["relu"]["saturation"] is None
    assert rows["tanh"]["saturation"] == pytest.approx(np.mean(np.abs(seen["tanh"]) >= 0.99))
    assert rows["tanh"]["dead_fraction"] is None


def test_reports_tensorboard_report_blob_ranks_findings(tmp_path: Path) -> None:
    report = replace(actdiag.inspect(DeepNet(depth=2), torch.randn(8, 16)), findings=hand_findings())
    sink = TensorBoardSink(tmp_path)
    sink.on_close(report)
    ea = _load(tmp_path)
    (event,) = ea.Tensors(REPORT_TAG)
    assert ea.SummaryMetadata(REPORT_TAG).plugin_data.plugin_name == PLUGIN_NAME
    blob = json.loads(event.tensor_proto.string_val[0].decode())
    # Most severe first; the markup in names and snippets is kept as it is (the dashboard shows it as text).
    assert [f["code"] for f in blob["findings"]] == ["vanishing_gradient", "dead_relu", "fp16_underflow"]
    assert blob["findings"][0]["layer"] == XSS_NAME
    assert blob["findings"][1]["fixes"][0]["snippet"].endswith("<script>alert(2)</script>")
    assert blob["findings"][1]["fixes"][0]["verified"] is True
    assert blob["model"]["name"] == "DeepNet" and blob["run"]["recorded_steps"] == report.run.recorded_steps


def test_reports_tensorboard_layout_and_findings(tmp_path: Path) -> None:
    model = DeepNet(depth=8)
    report = actdiag.inspect(model, torch.randn(16, 16))
    sink = TensorBoardSink(tmp_path)
    report = replace(report, findings=hand_findings())
    sink.on_close(report)  # a sink that saw no step still writes the layout and the findings
    ea = _load(tmp_path)
    (cfg,) = ea.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(cfg.tensor_proto.string_val[0])
    titles = [c.title for c in layout.category]
    # No optimizer step, so no update ratios: that family has no chart.
    assert titles == [
        "actdiag: activation std",
        "actdiag: gradient norm",
        "actdiag: dead ReLU fraction",
        "actdiag: saturated fraction",
    ]
    labels = [ly.label for ly in report.layers]
    expected = {
        "act_std": labels,
        "grad_norm": labels,
        "dead_fraction": [ly.label for ly in report.layers if ly.type == "ReLU"],
        "saturation": [ly.label for ly in report.layers if ly.type in ("Tanh", "Sigmoid")],
    }
    for cat in layout.category:
        prefix = cat.chart[0].multiline.tag[0][1:].split("/", 1)[0].replace("\\", "")
        matched = []
        for chart in cat.chart:
            assert len(chart.multiline.tag) <= LAYERS_PER_CHART
            matched += [lb for lb in labels if any(re.match(t, f"{prefix}/{lb}") for t in chart.multiline.tag)]
        assert matched == expected[prefix]  # every layer that has it exactly once, in depth order
    assert XSS_NAME in labels

    (text,) = ea.Tensors(FINDINGS_TAG)
    md = text.tensor_proto.string_val[0].decode()
    assert md == findings_markdown(report.findings)
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    # One row per finding, in the given (ranked) order, with its fixes and verification.
    assert "vanishing_gradient" in rows[1] and "residual_connections (did not help)" in rows[1]
    assert "leaky_relu (verified); he_init" in rows[0]
    assert "\\| pipes \\|" in rows[1]  # a pipe in a message does not split the table
    assert "<b>" not in md and "<img" not in md and "&lt;img src=x onerror=alert(1)&gt;" in md
    assert all(len(re.split(r"(?<!\\)\|", row)) == 8 for row in rows)  # six cells in every row


def test_reports_tensorboard_findings_markdown_empty() -> None:
    assert "no findings" in findings_markdown(())


def test_reports_tensorboard_layout_splits_many_layers() -> None:
    labels = [f"layers.{i}" for i in range(30)] + ["a.b+c", "(x)"]
    layout = custom_scalars_layout({"act_std": labels, "saturation": labels[:3]})
    assert list(layout) == ["actdiag: activation std", "actdiag: saturated fraction"]
    charts = layout["actdiag: activation std"]
    assert len(charts) == 3
    tags = [t for c in charts.values() for t in c[1]]
    # Anchored and escaped: "layers.1" must not match "layers.10" nor "layersX1".
    assert sum(bool(re.match(t, "act_std/layers.1")) for t in tags) == 1
    assert not any(re.match(t, "act_std/layersX1") for t in tags)
    assert sum(bool(re.match(t, "act_std/a.b+c")) for t in tags) == 1


def test_reports_tensorboard_watch_writes_live_without_blocking(tmp_path: Path) -> None:
    """on_record returns while the writer is stuck; once released every step reaches the file, in order."""
    model = DeepNet(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 16)
    gate = threading.Event()
    monitor = actdiag.watch(model, every=1, logdir=tmp_path, strict=True)
    sink = next(s for s in monitor.sinks if isinstance(s, TensorBoardSink))
    real = sink._write_record

    def slow(record: object) -> None:
        gate.wait()
        real(record)  # type: ignore[arg-type]

    sink._write_record = slow  # type: ignore[method-assign]
    with monitor:
        for _ in range(6):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            monitor.step()  # would hang here if on_record wrote synchronously
        assert sink.written_steps == 0
        gate.set()
        sink.flush()
        assert sink.written_steps == 6
        live = _load(tmp_path)
        assert [e.step for e in live.Scalars("act_std/blocks.fc0")] == list(range(6))
    ea = _load(tmp_path)
    assert [e.step for e in ea.Histograms("activations/blocks.act1")] == list(range(6))
    assert [e.step for e in ea.Scalars("update_ratio/blocks.fc1")] == list(range(6))
    assert FINDINGS_TAG in ea.Tags()["tensors"]


def test_reports_tensorboard_drops_when_far_behind(tmp_path: Path) -> None:
    model = DeepNet(depth=1)
    records = []
    with actdiag.watch(model, every=1) as monitor:
        for _ in range(4):
            model(torch.randn(4, 16)).sum().backward()
            monitor.step()
            records.append(monitor.latest)
    sink = TensorBoardSink(tmp_path, max_pending=1)
    entered, gate = threading.Event(), threading.Event()
    real = sink._write_record

    def slow(record: object) -> None:
        entered.set()
        gate.wait()
        real(record)  # type: ignore[arg-type]

    sink._write_record = slow  # type: ignore[method-assign]
    sink.on_record(records[0])
    entered.wait()  # the writer holds record 0; the queue (one slot) is empty
    for r in records[1:]:
        sink.on_record(r)
    gate.set()
    sink.on_close(monitor.report())
    # Record 1 waited in the queue; records 2 and 3 found it full and were dropped, not waited for.
    assert sink.dropped == 2 and sink.written_steps == 2
    ea = _load(tmp_path)
    assert [e.step for e in ea.Scalars("act_std/blocks.fc0")] == [0, 1]
    assert "actdiag/notes" in ea.Tags()["tensors"]


def test_reports_tensorboard_writer_failure_does_not_stop_training(tmp_path: Path) -> None:
    model = DeepNet(depth=1)
    monitor = actdiag.watch(model, every=1, logdir=tmp_path)
    sink = next(s for s in monitor.sinks if isinstance(s, TensorBoardSink))

    def boom(record: object) -> None:
        raise OSError("disk full")

    sink._write_record = boom  # type: ignore[method-assign]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monitor:
            for _ in range(4):
                model(torch.randn(4, 16)).sum().backward()
                monitor.step()
    assert monitor.steps == 4
    assert any("disk full" in str(w.message) for w in caught)


def test_reports_tensorboard_nonfinite_layers_are_skipped_not_fatal(tmp_path: Path) -> None:
    from .test_reports_html import NanNet

    actdiag.inspect(NanNet(), torch.randn(8, 4), logdir=str(tmp_path))
    tags = _load(tmp_path).Tags()
    assert "activations/fc" in tags["histograms"]
    # Layers with no finite value have no histogram and no std, rather than a fake one.
    assert "activations/out" not in tags["histograms"] and "act_std/out" not in tags["scalars"]


def test_reports_tensorboard_unclosed_watch_is_flushed_at_exit(tmp_path: Path) -> None:
    """A script that never closes its watch still leaves every recorded step on disk when Python exits."""
    import subprocess
    import sys

    code = (
        "import time, torch, actdiag\n"
        "from torch import nn\n"
        "m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())\n"
        f"mon = actdiag.watch(m, every=1, logdir={str(tmp_path)!r}).start()\n"
        "sink = mon.sinks[0]\n"
        "write = sink._write_record\n"
        "sink._write_record = lambda r: (time.sleep(0.3), write(r))  # a slow disk: the writer is still busy at exit\n"
        "for _ in range(5):\n"
        "    m(torch.randn(2, 4)).sum().backward()\n"
        "    mon.step()\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=300)
    ea = _load(tmp_path)
    assert [e.step for e in ea.Scalars("act_std/0")] == [0, 1, 2, 3, 4]


def test_reports_tensorboard_forked_child_does_not_write(tmp_path: Path) -> None:
    """A forked child (a DataLoader worker, say) that closes its inherited watch or exits through the at-exit path
    neither hangs on the parent's writer nor writes into the parent's event file."""
    import os

    model = DeepNet(depth=1)
    monitor = actdiag.watch(model, every=1, logdir=tmp_path).start()
    for _ in range(3):
        model(torch.randn(4, 16)).sum().backward()
        monitor.step()
    sink = next(s for s in monitor.sinks if isinstance(s, TensorBoardSink))
    sink.flush()
    pid = os.fork()
    if pid == 0:  # the child: what interpreter exit would do, then leave without running the parent's cleanup
        from actdiag.reports import tensorboard as tb

        try:
            sink.on_record(monitor.latest)  # type: ignore[arg-type]
            sink.on_close(monitor.report())  # what a watch closed in the child would do
            tb._close_open_sinks()
        finally:
            os._exit(0)
    # Bounded wait: without the guard the child blocks forever flushing through a writer thread it does not have.
    import signal
    import time

    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung closing the parent's TensorBoard writer")
        time.sleep(0.05)
    monitor.close()
    ea = _load(tmp_path)
    assert [e.step for e in ea.Scalars("act_std/blocks.fc0")] == [0, 1, 2]
    assert len(ea.Tensors(FINDINGS_TAG)) == 1
