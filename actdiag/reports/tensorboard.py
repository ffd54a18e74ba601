"""TensorBoard sink: the layout of shared/CONTRACT.md section 5, written through `torch.utils.tensorboard`.

    activations/<layer>  gradients/<layer>  weights/<param>  weight_grads/<param>     histograms
    act_std/<layer>  grad_norm/<layer>  dead_fraction/<layer>  saturation/<layer>  update_ratio/<layer>   scalars
    weight_norm/<param>                                                               scalars
    custom_scalars__config__                                                          one layout, per metric
    actdiag/findings                                                                  Markdown table, at close
    actdiag/profile                                                                   JSON, per recorded step
    actdiag/report                                                                    JSON findings, at close

The two JSON tags carry `plugin_name = "actdiag"`: they feed actdiag's own dashboard (`actdiag.reports.tbplugin`),
and TensorBoard's other tabs ignore them. `actdiag/profile` holds a step's depth profile (per layer: activation std,
mean, abs max, dead and saturated share, gradient RMS), `actdiag/report` the ranked findings with their fixes.

Histograms come from the counts the recorder already computed on the device (`add_histogram_raw`); no tensor is
ever copied here. Everything goes through one `SummaryWriter` on the run directory itself: `add_scalars` is never
used because it opens a sub-run per series.

Writing a step costs a few hundred protobuf messages for a large model, which must not be paid inside the training
loop. `on_record` only puts the (immutable) record on a bounded queue; a daemon thread turns records into events and
flushes whenever it has caught up. `on_close` drains the queue, writes the findings, flushes and closes, and an
`atexit` hook does the same for a watch that is never closed, so the last steps reach the disk.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import re
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actdiag.metrics import ACT_STD, DEAD_FRACTION, GRAD_NORM, SATURATION, UPDATE_RATIO
from actdiag.records import SEVERITY_RANK, Finding, LayerStats, Report, StepRecord, TensorStats

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

# Scalars per layer, in the order of the custom-scalars layout: (tag prefix, chart category title).
SCALAR_TAGS: tuple[tuple[str, str], ...] = (
    (ACT_STD, "activation std"),
    (GRAD_NORM, "gradient norm"),
    (DEAD_FRACTION, "dead ReLU fraction"),
    (SATURATION, "saturated fraction"),
    (UPDATE_RATIO, "update ratio |dW|/|W|"),
)
FINDINGS_TAG = "actdiag/findings"
# actdiag's own summaries, read by its TensorBoard plugin (the plugin name is in shared/CONTRACT.md section 6).
PLUGIN_NAME = "actdiag"
PROFILE_TAG = "actdiag/profile"
REPORT_TAG = "actdiag/report"
# The JSON blobs' layout; the plugin reads this version and says so when a logdir holds another.
BLOB_SCHEMA = "actdiag.tensorboard/1"
# A multiline chart with more lines than this is unreadable; the layout splits layers into charts of this size.
LAYERS_PER_CHART = 12
# Records waiting for the writer thread. A step is a few kilobytes of floats, so this bounds memory at a few MB;
# when the writer falls this far behind, new steps are dropped (and counted) rather than stalling training.
MAX_PENDING = 256

_STOP = object()
# Sinks not closed yet; at interpreter exit each is drained and closed so the last steps reach the disk.
_OPEN: weakref.WeakSet[TensorBoardSink] = weakref.WeakSet()


def _close_open_sinks() -> None:
    for sink in list(_OPEN):
        sink._shutdown()


atexit.register(_close_open_sinks)


def layer_tag(label: str) -> str:
    """A layer's name as it appears in tags; the root module (a model that is itself a leaf) has the empty name."""
    return label or "(model)"


def layer_scalars(layer: LayerStats) -> dict[str, float]:
    """The section-5 scalars of one layer that apply to it and are finite: a subset of the history's
    `metrics.layer_metrics`, without the NaNs (and without a norm for a gradient with no finite value)."""
    out: dict[str, float] = {}
    if layer.activation is not None and layer.activation.count:
        out[ACT_STD] = layer.activation.std
    if layer.gradient is not None and layer.gradient.count:
        out[GRAD_NORM] = layer.gradient.norm
    if layer.dead_fraction is not None:
        out[DEAD_FRACTION] = layer.dead_fraction
    if layer.saturation is not None:
        out[SATURATION] = layer.saturation
    if layer.update_ratio is not None:
        out[UPDATE_RATIO] = layer.update_ratio
    return {k: v for k, v in out.items() if math.isfinite(v)}


def histogram_args(stats: TensorStats) -> dict[str, Any] | None:
    """Keyword arguments for `SummaryWriter.add_histogram_raw` from precomputed stats; None with no finite value.

    TensorBoard buckets are given by their upper limits (the first bucket starts at `min`). When the counts come
    from a sample of the tensor, `num`, `sum` and `sum_squares` are scaled to the sample so they agree with the
    buckets, which is what TensorBoard draws.
    """
    h = stats.histogram
    if stats.count == 0 or not h.counts:
        return None
    num = h.total
    if num <= 0:
        return None
    scale = num / stats.count
    sum_sq = (max(stats.m2, 0.0) + stats.count * stats.mean * stats.mean) * scale
    return {
        "min": float(h.edges[0]),
        "max": float(h.edges[-1]),
        "num": int(round(num)),
        "sum": stats.mean * num,
        "sum_squares": sum_sq,
        "bucket_limits": [float(e) for e in h.edges[1:]],
        "bucket_counts": [float(c) for c in h.counts],
    }


def custom_scalars_layout(series: Mapping[str, Sequence[str]]) -> dict[str, dict[str, list[Any]]]:
    """One category per scalar family that some layer has, each split into charts of at most LAYERS_PER_CHART
    layers in depth order. `series` maps a tag prefix (act_std, ...) to the labels of the layers that have it.

    Charts name their tags with anchored, escaped regular expressions (TensorBoard matches them as regexes), so a
    layer name with regex characters selects exactly itself.
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for prefix, title in SCALAR_TAGS:
        tags = [layer_tag(lb) for lb in series.get(prefix, ())]
        charts: dict[str, list[Any]] = {}
        for start in range(0, len(tags), LAYERS_PER_CHART):
            chunk = tags[start : start + LAYERS_PER_CHART]
            name = f"{prefix}: layers {start + 1}-{start + len(chunk)} ({chunk[0]} .. {chunk[-1]})"
            charts[name] = ["Multiline", [f"^{re.escape(prefix + '/' + t)}$" for t in chunk]]
        if charts:
            layout[f"actdiag: {title}"] = charts
    return layout


def layout_series(layers: Sequence[LayerStats]) -> dict[str, list[str]]:
    """Which layers have which section-5 scalar, in depth order (a ReLU has no saturation, a Tanh no dead units)."""
    series: dict[str, list[str]] = {}
    for layer in layers:
        for prefix in layer_scalars(layer):
            series.setdefault(prefix, []).append(layer.label)
    return series


def _finite(v: float | None) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def layer_profile(layer: LayerStats) -> dict[str, Any]:
    """One layer's row of the depth profile: what the dashboard plots per layer, None where it does not apply.

    A zero stays 0.0 (a dead layer's activation std, a gradient that is exactly zero): the dashboard marks zeros
    apart from missing values, which a log scale could not show.
    """
    act, grad = layer.activation, layer.gradient
    return {
        "layer": layer_tag(layer.label),
        "type": layer.type,
        "act_std": _finite(act.std) if act is not None and act.count else None,
        "act_mean": _finite(act.mean) if act is not None and act.count else None,
        "act_abs_max": _finite(act.abs_max) if act is not None and act.count else None,
        "act_nonfinite": act.nonfinite_count if act is not None else None,
        "grad_rms": _finite(grad.rms) if grad is not None and grad.count else None,
        "grad_nonfinite": grad.nonfinite_count if grad is not None else None,
        "dead_fraction": _finite(layer.dead_fraction),
        "saturation": _finite(layer.saturation),
        "units": layer.units,
    }


def profile_blob(record: StepRecord) -> dict[str, Any]:
    """The `actdiag/profile` JSON of one recorded step: its layers in forward (depth) order."""
    return {"schema": BLOB_SCHEMA, "step": record.step, "layers": [layer_profile(ly) for ly in record.layers]}


def report_blob(report: Report) -> dict[str, Any]:
    """The `actdiag/report` JSON: the findings most severe first (a stable sort keeps the rules' order within a
    severity), with their evidence and fixes as in the JSON report."""
    from actdiag.reports.json import finding_to_dict

    ranked = sorted(report.findings, key=lambda f: -SEVERITY_RANK.get(f.severity, 0))
    return {
        "schema": BLOB_SCHEMA,
        "model": {"name": report.model.name, "parameters": report.model.parameters},
        "run": {"steps": report.run.steps, "recorded_steps": report.run.recorded_steps, "every": report.run.every},
        "findings": [finding_to_dict(f) for f in ranked],
    }


def json_summary(tag: str, blob: Mapping[str, Any]) -> Any:
    """A `Summary` holding `blob` as a JSON string tensor under actdiag's plugin name.

    The data class is set so that TensorBoard's Rust data server (`--load_fast`) ingests it as well as the Python
    reader: it skips summaries of a plugin it does not know whose data class is unset.
    """
    from tensorboard.compat.proto.summary_pb2 import DATA_CLASS_TENSOR, Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.types_pb2 import DT_STRING

    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=BLOB_SCHEMA.encode()),
        data_class=DATA_CLASS_TENSOR,
    )
    # allow_nan=False: the blob's numbers went through _finite, and strict JSON is what the browser parses.
    text = json.dumps(blob, allow_nan=False, separators=(",", ":"))
    tensor = TensorProto(dtype=DT_STRING, string_val=[text.encode("utf-8")])
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])


def _md_cell(text: object) -> str:
    """Text safe inside one Markdown table cell: no pipes or newlines, no raw HTML."""
    s = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def findings_markdown(findings: Iterable[Finding]) -> str:
    """The ranked findings as a Markdown table (TensorBoard's text dashboard renders Markdown)."""
    rows = list(findings)
    if not rows:
        return "**actdiag: no findings.** No rule fired on the recorded steps."
    lines = [
        f"**actdiag: {len(rows)} finding{'s' if len(rows) != 1 else ''}**, most severe first.",
        "",
        "| # | severity | code | layer | message | fixes |",
        "|---|---|---|---|---|---|",
    ]
    for i, f in enumerate(rows, 1):
        fixes = "; ".join(
            f"{x.code}" + ("" if x.verified is None else (" (verified)" if x.verified else " (did not help)"))
            for x in f.fixes
        )
        layer = "(whole model)" if f.layer is None else f.layer
        lines.append(
            f"| {i} | {_md_cell(f.severity)} | {_md_cell(f.code)} | {_md_cell(layer)} | {_md_cell(f.message)} "
            f"| {_md_cell(fixes or '-')} |"
        )
    return "\n".join(lines)


class TensorBoardSink:
    """Writes recorded steps and the final findings to one TensorBoard run directory, off the training thread."""

    def __init__(self, logdir: str | os.PathLike[str], *, max_pending: int = MAX_PENDING) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is a dependency, but a broken install should say what to do
            raise ImportError(
                "actdiag's TensorBoard output needs the tensorboard package: pip install tensorboard"
            ) from exc
        self.logdir = Path(logdir)
        # max_queue/flush_secs: the writer thread below decides when to flush, so SummaryWriter's own 2-minute
        # timer is only a fallback.
        self._writer: SummaryWriter = SummaryWriter(log_dir=str(self.logdir), max_queue=1000, flush_secs=30)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, max_pending))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._layout_written = False
        self._closed = False
        self._lock = threading.Lock()
        self.dropped = 0
        self.written_steps = 0
        # A forked child (a DataLoader worker, say) inherits this object and the open event file, but not the
        # writer thread: only the process that created the sink may write or close it.
        self._pid = os.getpid()
        # A watch that is never closed still gets its buffered steps written when the interpreter exits.
        _OPEN.add(self)

    # ------------------------------------------------------------------ Sink protocol
    def on_record(self, record: StepRecord) -> None:
        """Queue one recorded step; returns at once. Raises the writer thread's error, if it had one."""
        self._raise_if_failed()
        if self._closed or os.getpid() != self._pid:
            return
        self._ensure_thread()
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def on_close(self, report: Report) -> None:
        """Write everything still queued, the findings and the layout; flush and close the event file."""
        self._shutdown(report)
        self._raise_if_failed()

    def flush(self) -> None:
        """Wait until every queued step is written and on disk (for callers that want to look at a live run)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()
        with self._lock:
            if not self._closed:
                self._writer.flush()
        self._raise_if_failed()

    # ------------------------------------------------------------------ internals
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="actdiag-tensorboard", daemon=True)
            self._thread.start()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the TensorBoard writer failed: {self._error}") from self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    with self._lock:
                        self._write_record(item)
                        if self._queue.empty():
                            # Caught up with training: put what we have on disk so a live dashboard sees it.
                            self._writer.flush()
            except Exception as exc:  # noqa: BLE001 - reported to the training thread at its next call
                self._error = exc
            finally:
                self._queue.task_done()

    def _shutdown(self, report: Report | None = None) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._closed:
                return
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
        with self._lock:
            self._closed = True
            try:
                if report is not None and self._error is None:
                    if not self._layout_written and report.layers:
                        self._write_layout(report.layers)
                    # The findings describe the latest recorded step, so they sit at its step on the text axis.
                    step = report.layers[0].step if report.layers else 0
                    self._add_text(FINDINGS_TAG, findings_markdown(report.findings), step)
                    self._writer._get_file_writer().add_summary(json_summary(REPORT_TAG, report_blob(report)), step)
                    if self.dropped:
                        self._add_text(
                            "actdiag/notes",
                            f"{self.dropped} recorded steps were not written: the TensorBoard writer fell behind "
                            f"training by more than {self._queue.maxsize} steps. Record less often (watch(every=...)).",
                            step,
                        )
            except Exception as exc:  # noqa: BLE001
                self._error = exc
            finally:
                self._writer.close()
                _OPEN.discard(self)

    def _add_text(self, tag: str, markdown: str, step: int) -> None:
        # SummaryWriter.add_text appends "/text_summary" to the tag; the contract names the tag itself, so the
        # summary comes from TensorBoard's own text plugin and goes to the writer's event file directly.
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._writer._get_file_writer().add_summary(text_pb(tag, markdown), step)

    def _write_layout(self, layers: Sequence[LayerStats]) -> None:
        # From the first recorded step: the layout lists each layer under the scalars it has.
        self._writer.add_custom_scalars(custom_scalars_layout(layout_series(layers)))
        self._layout_written = True

    def _write_record(self, record: StepRecord) -> None:
        w = self._writer
        step = record.step
        if not self._layout_written and record.layers:
            self._write_layout(record.layers)
        for layer in record.layers:
            tag = layer_tag(layer.label)
            for kind, stats in (("activations", layer.activation), ("gradients", layer.gradient)):
                if stats is not None and (args := histogram_args(stats)) is not None:
                    w.add_histogram_raw(f"{kind}/{tag}", global_step=step, **args)
            for prefix, value in layer_scalars(layer).items():
                w.add_scalar(f"{prefix}/{tag}", value, global_step=step)
        for p in record.params:
            for kind, stats in (("weights", p.weight), ("weight_grads", p.grad)):
                if stats is not None and (args := histogram_args(stats)) is not None:
                    w.add_histogram_raw(f"{kind}/{p.name}", global_step=step, **args)
            # The L2 norm over the finite elements: weight decay (or its absence) shows as this curve's slope.
            if p.weight.count and math.isfinite(norm := p.weight.norm):
                w.add_scalar(f"weight_norm/{p.name}", norm, global_step=step)
        if record.layers:
            w._get_file_writer().add_summary(json_summary(PROFILE_TAG, profile_blob(record)), step)
        self.written_steps += 1
