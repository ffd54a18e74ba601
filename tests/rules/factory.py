"""Hand-built records for threshold tests: exactly the statistics a test needs, nothing measured."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from actdiag.hooks.stats import N_EXP
from actdiag.records import E_LOW, ExponentHistogram, Histogram, History, LayerStats, TensorStats


def exps(bins: Mapping[int, float] | None = None) -> ExponentHistogram:
    """An exponent histogram with `bins[e]` values in exponent bin e (2**(e-1) <= |x| < 2**e)."""
    counts = [0.0] * N_EXP
    for e, c in (bins or {}).items():
        counts[e - E_LOW] = float(c)
    return ExponentHistogram(counts=tuple(counts))


def ts(
    std: float = 1.0,
    mean: float = 0.0,
    count: int = 1000,
    numel: int | None = None,
    exponents: ExponentHistogram | None = None,
    zero_count: int = 0,
) -> TensorStats:
    """TensorStats with the given population std and mean over `count` finite values."""
    n = count if numel is None else numel
    lo, hi = (mean - 2 * std, mean + 2 * std) if count else (math.nan, math.nan)
    return TensorStats(
        numel=n,
        count=count,
        mean=mean if count else math.nan,
        m2=std * std * count if count else math.nan,
        min=lo,
        max=hi,
        zero_count=zero_count,
        histogram=Histogram(edges=(lo, hi) if count else (0.0, 1.0), counts=(float(count),)),
        exponents=exponents if exponents is not None else exps({1: count}),
    )


def linear(
    name: str, std: float, grad: float | None = None, width: int = 100, batch: int = 10, **kw: object
) -> LayerStats:
    """A Linear layer output with activation std `std` (and gradient std `grad`)."""
    count = width * batch
    return LayerStats(
        name=name,
        type="Linear",
        step=0,
        shape=(batch, width),
        dtype="float32",
        activation=ts(std, count=count),
        gradient=ts(grad, count=count) if grad is not None else None,
        weight=ts(1.0 / math.sqrt(width), count=width * width),
        weight_grad=ts(1e-3, count=width * width) if grad is not None else None,
        weight_name=f"{name}.weight",
        **kw,  # type: ignore[arg-type]
    )


def chain(stds: Sequence[float], grads: Sequence[float] | None = None) -> list[LayerStats]:
    """Linear layers fc0, fc1, ... with the given output stds, and a GELU after the last (so it is no output head)."""
    layers = [linear(f"fc{i}", s, None if grads is None else grads[i]) for i, s in enumerate(stds)]
    return [*layers, activation("out", "GELU", 0.5, count=1000)]


def activation(name: str, kind: str, std: float, count: int = 1000) -> LayerStats:
    """A weightless activation module's output."""
    return LayerStats(
        name=name, type=kind, step=0, shape=(10, count // 10), dtype="float32", activation=ts(std, count=count)
    )


def bounded(name: str, saturation: float, kind: str = "Tanh", width: int = 100, batch: int = 10) -> LayerStats:
    return LayerStats(
        name=name,
        type=kind,
        step=0,
        shape=(batch, width),
        dtype="float32",
        activation=ts(0.5, count=width * batch),
        bounds=(-1.0, 1.0) if kind == "Tanh" else (0.0, 1.0),
        saturation=saturation,
    )


def relu(name: str, dead: float, units: int = 100, batch: int = 10, never: float | None = None) -> LayerStats:
    return LayerStats(
        name=name,
        type="ReLU",
        step=0,
        shape=(batch, units),
        dtype="float32",
        activation=ts(0.5, mean=0.4, count=units * batch),
        units=units,
        dead_fraction=dead,
        rare_fraction=dead,
        never_active_fraction=dead if never is None else never,
    )


def history(
    layers: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    params: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
) -> History:
    series = list((layers or {}).values()) + list((params or {}).values())
    n = max((len(v) for s in series for v in s.values()), default=0)
    return History(
        steps=tuple(range(n)),
        layers={k: {m: tuple(v) for m, v in s.items()} for k, s in (layers or {}).items()},
        params={k: {m: tuple(v) for m, v in s.items()} for k, s in (params or {}).items()},
    )
