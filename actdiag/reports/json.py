"""The JSON document of shared/CONTRACT.md section 3 (schema actdiag.report/1)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from actdiag.records import E_LOW, ExponentHistogram, Finding, Fix, History, LayerStats, ParamStats, Report, TensorStats
from actdiag.reports._atomic import atomic_write

SCHEMA = "actdiag.report/1"


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
