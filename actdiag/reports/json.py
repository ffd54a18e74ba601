"""The JSON document of shared/CONTRACT.md section 3 (schema actdiag.report/1): writing it, and reading it back.

`load_json` turns a saved document back into a `Report`, so that saved runs can be shown again (`actdiag report`)
and compared (`actdiag diff`). What the document holds comes back exactly: saving a loaded report writes the same
document. What it does not hold stays empty (per-step histograms of a watch's history, the step number of the
latest record, a weight's parameter name). A file that is not an actdiag report, or one of another schema version,
raises `ReportReadError` with one line naming the file and the cause.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from actdiag.errors import ReportReadError
from actdiag.records import (
    E_HIGH,
    E_LOW,
    ExponentHistogram,
    Finding,
    Fix,
    Histogram,
    History,
    LayerStats,
    LostUpdates,
    ModelInfo,
    ParamStats,
    Report,
    RunInfo,
    TensorStats,
)
from actdiag.reports._atomic import atomic_write

SCHEMA = "actdiag.report/1"
SCHEMA_FAMILY = "actdiag.report/"


def _num(v: float) -> float | None:
    """JSON has no NaN/Inf: those become null."""
    return float(v) if math.isfinite(v) else None


def exponents_to_dict(e: ExponentHistogram) -> dict[str, Any]:
    rng = e.nonzero_range()
    if rng is None:
        return {"exponents": [], "counts": [], "sampled": e.sampled}
    lo, hi = rng
    return {
        "exponents": list(range(lo, hi + 1)),
        "counts": [int(c) for c in e.counts[lo - E_LOW : hi - E_LOW + 1]],
        "sampled": e.sampled,
    }


def stats_to_dict(s: TensorStats) -> dict[str, Any]:
    return {
        "count": s.count,
        "mean": _num(s.mean),
        "std": _num(s.std),
        "min": _num(s.min),
        "max": _num(s.max),
        "abs_max": _num(s.abs_max),
        "zero_fraction": s.zero_fraction,
        "nonfinite_count": s.nonfinite_count,
        "estimated": list(s.estimated),  # the fields from a sample (CONTRACT.md, "Exactness"); [] when exact
        "histogram": {
            "edges": [float(e) for e in s.histogram.edges],
            "counts": [int(c) for c in s.histogram.counts],
            "sampled": s.histogram.sampled,
        },
        "exponent_histogram": exponents_to_dict(s.exponents),
    }


def layer_to_dict(layer: LayerStats) -> dict[str, Any]:
    d: dict[str, Any] = {"name": layer.name, "type": layer.type}
    if layer.call:
        d["call"] = layer.call
    d["shape"] = list(layer.shape)
    d["dtype"] = layer.dtype
    for key in ("activation", "gradient", "weight", "weight_grad"):
        s = getattr(layer, key)
        if s is not None:
            d[key] = stats_to_dict(s)
    for key in ("saturation", "dead_fraction", "rare_fraction", "never_active_fraction", "update_ratio"):
        v = getattr(layer, key)
        if v is not None:
            d[key] = _num(v)
    if layer.update_ratio is not None and layer.update_ratio_estimated:
        d["estimated"] = ["update_ratio"]
    if layer.bounds is not None:
        d["bounds"] = list(layer.bounds)
    if layer.units is not None:
        d["units"] = layer.units
    if layer.output:
        d["output"] = True
    return d


def param_to_dict(p: ParamStats) -> dict[str, Any]:
    d: dict[str, Any] = {"name": p.name, "shape": list(p.shape), "requires_grad": p.requires_grad}
    d["weight"] = stats_to_dict(p.weight)
    if p.grad is not None:
        d["grad"] = stats_to_dict(p.grad)
    if p.update_ratio is not None:
        d["update_ratio"] = _num(p.update_ratio)
        if p.update_ratio_estimated:
            d["estimated"] = ["update_ratio"]
    if p.lost_updates is not None:
        lost = p.lost_updates
        d["lost_updates"] = {"unchanged": lost.unchanged, "nonzero": lost.nonzero, "dtype": lost.dtype}
        if lost.estimated:
            d["lost_updates"]["estimated"] = True
    return d


def fix_to_dict(f: Fix) -> dict[str, Any]:
    d: dict[str, Any] = {"code": f.code, "text": f.text, "snippet": f.snippet, "verified": f.verified}
    if f.before:
        d["before"] = {k: _num(v) for k, v in f.before.items()}
    if f.after:
        d["after"] = {k: _num(v) for k, v in f.after.items()}
    return d


def finding_to_dict(f: Finding) -> dict[str, Any]:
    d: dict[str, Any] = {
        "code": f.code,
        "severity": f.severity,
        "layer": f.layer,
        "message": f.message,
        "evidence": {k: _num(v) if isinstance(v, float) else v for k, v in f.evidence.items()},
        "fixes": [fix_to_dict(x) for x in f.fixes],
    }
    if f.related:
        d["related"] = list(f.related)
    return d


def history_to_dict(h: History) -> dict[str, Any]:
    def series(values: tuple[float, ...]) -> list[float | None]:
        return [_num(v) for v in values]

    return {
        "steps": list(h.steps),
        "layers": {name: {m: series(v) for m, v in metrics.items()} for name, metrics in h.layers.items()},
        "params": {name: {m: series(v) for m, v in metrics.items()} for name, metrics in h.params.items()},
    }


def report_to_dict(report: Report) -> dict[str, Any]:
    d: dict[str, Any] = {
        "schema": SCHEMA,
        "model": {"name": report.model.name, "parameters": report.model.parameters},
        "run": {
            "steps": report.run.steps,
            "recorded_steps": report.run.recorded_steps,
            "every": report.run.every,
            "device": report.run.device,
            "torch": report.run.torch,
            "actdiag": report.run.actdiag,
        },
        "layers": [layer_to_dict(layer) for layer in report.layers],
        "params": [param_to_dict(p) for p in report.params],
        "findings": [finding_to_dict(f) for f in report.findings],
    }
    if report.history is not None and report.history.steps:
        d["history"] = history_to_dict(report.history)
    return d


def dumps(report: Report) -> str:
    return json.dumps(report_to_dict(report), indent=1, allow_nan=False) + "\n"


def save_json(report: Report, path: str | os.PathLike[str]) -> Path:
    return atomic_write(path, dumps(report))


# ------------------------------------------------------------------------------------------------ reading back
class _Bad(Exception):
    """A document that has the right schema but not the right shape; `load_json` words it for the user."""


def _float(v: Any) -> float:
    """null (how NaN/Inf are written) back to NaN; a number as a float."""
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad(f"expected a number, found {v!r}")
    return float(v)


def _opt_float(d: dict[str, Any], key: str) -> float | None:
    return _float(d[key]) if key in d else None


def _m2_for(std: float, count: int) -> float:
    """The sum of squared deviations whose `TensorStats.std` is exactly `std` again. std*std*count is within an ulp
    or two of it; the neighbours are searched so that a loaded report saves byte for byte as it was read."""
    if count <= 0 or not math.isfinite(std):
        return math.nan if count <= 0 else std
    m2 = std * std * count
    for _ in range(32):
        got = math.sqrt(max(m2, 0.0) / count)
        if got == std:
            return m2
        m2 = math.nextafter(m2, math.inf if got < std else -math.inf)
    return std * std * count


def exponents_from_dict(d: dict[str, Any]) -> ExponentHistogram:
    counts = [0] * (E_HIGH - E_LOW + 1)
    for e, c in zip(d["exponents"], d["counts"], strict=True):
        if not E_LOW <= int(e) <= E_HIGH:
            raise _Bad(f"exponent {e} outside [{E_LOW}, {E_HIGH}]")
        counts[int(e) - E_LOW] = int(c)
    return ExponentHistogram(counts, sampled=bool(d.get("sampled", False)))


def stats_from_dict(d: dict[str, Any]) -> TensorStats:
    count = int(d["count"])
    numel = count + int(d["nonfinite_count"])
    zero_fraction = float(d["zero_fraction"])
    hist = d["histogram"]
    exps = d.get("exponent_histogram")
    return TensorStats(
        numel=numel,
        count=count,
        mean=_float(d["mean"]),
        m2=_m2_for(_float(d["std"]), count),
        min=_float(d["min"]),
        max=_float(d["max"]),
        # zero_fraction was zero_count / numel: the product rounds back to the exact integer.
        zero_count=round(zero_fraction * numel),
        histogram=Histogram(
            [float(e) for e in hist["edges"]], [int(c) for c in hist["counts"]], bool(hist.get("sampled", False))
        ),
        exponents=exponents_from_dict(exps) if exps is not None else ExponentHistogram([0] * (E_HIGH - E_LOW + 1)),
        estimated=tuple(str(f) for f in d.get("estimated", ())),
    )


_LAYER_STATS = ("activation", "gradient", "weight", "weight_grad")
_LAYER_FLOATS = ("saturation", "dead_fraction", "rare_fraction", "never_active_fraction", "update_ratio")


def layer_from_dict(d: dict[str, Any], step: int) -> LayerStats:
    kw: dict[str, Any] = {key: stats_from_dict(d[key]) for key in _LAYER_STATS if key in d}
    kw.update({key: _opt_float(d, key) for key in _LAYER_FLOATS if key in d})
    if "bounds" in d:
        low, high = d["bounds"]
        kw["bounds"] = (_float(low), _float(high))
    if "units" in d:
        kw["units"] = int(d["units"])
    if "update_ratio" in d.get("estimated", ()):
        kw["update_ratio_estimated"] = True
    if d.get("output"):
        kw["output"] = True
    return LayerStats(
        name=str(d["name"]),
        type=str(d["type"]),
        step=step,
        call=int(d.get("call", 0)),
        shape=tuple(int(n) for n in d.get("shape", ())),
        dtype=str(d.get("dtype", "")),
        **kw,
    )


def param_from_dict(d: dict[str, Any]) -> ParamStats:
    return ParamStats(
        name=str(d["name"]),
        shape=tuple(int(n) for n in d["shape"]),
        requires_grad=bool(d["requires_grad"]),
        weight=stats_from_dict(d["weight"]),
        grad=stats_from_dict(d["grad"]) if "grad" in d else None,
        update_ratio=_opt_float(d, "update_ratio"),
        update_ratio_estimated="update_ratio" in d.get("estimated", ()),
        lost_updates=_lost_from_dict(d["lost_updates"]) if "lost_updates" in d else None,
    )


def _lost_from_dict(d: dict[str, Any]) -> LostUpdates:
    return LostUpdates(int(d["unchanged"]), int(d["nonzero"]), str(d["dtype"]), bool(d.get("estimated", False)))


def _numbers(d: dict[str, Any]) -> dict[str, float]:
    return {str(k): _float(v) for k, v in d.items()}


def fix_from_dict(d: dict[str, Any]) -> Fix:
    verified = d.get("verified")
    if verified not in (True, False, None):
        raise _Bad(f"fix 'verified' must be true, false or null, found {verified!r}")
    return Fix(
        code=str(d["code"]),
        text=str(d["text"]),
        snippet=str(d.get("snippet", "")),
        verified=verified,
        before=_numbers(d.get("before", {})),
        after=_numbers(d.get("after", {})),
    )


def finding_from_dict(d: dict[str, Any]) -> Finding:
    severity = d["severity"]
    if severity not in ("info", "warning", "error"):
        raise _Bad(f"finding severity must be info, warning or error, found {severity!r}")
    layer = d["layer"]
    return Finding(
        code=str(d["code"]),
        severity=severity,
        layer=None if layer is None else str(layer),
        message=str(d["message"]),
        # Evidence may hold numbers, text or lists (the writer keeps non-floats as they are); null was a NaN/Inf.
        evidence={str(k): math.nan if v is None else v for k, v in d.get("evidence", {}).items()},
        fixes=tuple(fix_from_dict(x) for x in d.get("fixes", ())),
        related=tuple(str(r) for r in d.get("related", ())),
    )


def history_from_dict(d: dict[str, Any]) -> History:
    def series(values: list[Any]) -> tuple[float, ...]:
        return tuple(_float(v) for v in values)

    return History(
        steps=tuple(int(s) for s in d["steps"]),
        layers={str(n): {str(m): series(v) for m, v in ms.items()} for n, ms in d.get("layers", {}).items()},
        params={str(n): {str(m): series(v) for m, v in ms.items()} for n, ms in d.get("params", {}).items()},
    )


def report_from_dict(d: Any) -> Report:
    """A `Report` from a parsed JSON document of this schema. ValueError (ReportReadError) when it is not one."""
    if not isinstance(d, dict) or "schema" not in d:
        raise ReportReadError('it is not an actdiag report (no "schema" key)')
    schema = d["schema"]
    if schema != SCHEMA:
        if isinstance(schema, str) and schema.startswith(SCHEMA_FAMILY):
            raise ReportReadError(f"it has schema {schema!r}, and this actdiag reads {SCHEMA!r}")
        raise ReportReadError(f"it is not an actdiag report (schema {schema!r})")
    try:
        run = d["run"]
        history = history_from_dict(d["history"]) if "history" in d else None
        step = history.steps[-1] if history is not None and history.steps else max(int(run["steps"]) - 1, 0)
        return Report(
            model=ModelInfo(name=str(d["model"]["name"]), parameters=int(d["model"]["parameters"])),
            run=RunInfo(
                steps=int(run["steps"]),
                recorded_steps=int(run.get("recorded_steps", run["steps"])),
                device=str(run["device"]),
                torch=str(run["torch"]),
                actdiag=str(run["actdiag"]),
                every=int(run.get("every", 1)),
            ),
            layers=tuple(layer_from_dict(x, step) for x in d["layers"]),
            params=tuple(param_from_dict(x) for x in d.get("params", ())),
            findings=tuple(finding_from_dict(x) for x in d["findings"]),
            history=history,
        )
    except KeyError as exc:
        raise ReportReadError(f"it is a damaged actdiag report: the key {exc.args[0]!r} is missing") from None
    except (_Bad, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ReportReadError(f"it is a damaged actdiag report ({exc})") from None


def loads(text: str) -> Report:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportReadError(f"it is not JSON ({exc.msg} at line {exc.lineno})") from None
    return report_from_dict(doc)


def load_json(path: str | os.PathLike[str]) -> Report:
    """Read a report written by `save_json` (or `actdiag inspect --json`). ReportReadError, one line naming the file
    and the cause, when it cannot be read, is not JSON, not an actdiag report, or of another schema version."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportReadError(f"{p} does not exist") from None
    except IsADirectoryError:
        raise ReportReadError(f"{p} is a directory, not a report file") from None
    except UnicodeDecodeError:
        raise ReportReadError(f"cannot read {p}: it is not an actdiag report (not UTF-8 text)") from None
    except OSError as exc:
        raise ReportReadError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        return loads(text)
    except ReportReadError as exc:
        raise ReportReadError(f"cannot read {p}: {exc}") from None
