"""The rules never raise, whatever odd statistics a model they have never seen produces."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from actdiag.records import LayerStats, ParamStats, TensorStats
from actdiag.rules import diagnose
from tests.rules.factory import exps, history, ts

floats = st.one_of(
    st.floats(min_value=-1e30, max_value=1e30, allow_nan=False),
    st.sampled_from([0.0, math.nan, math.inf, -math.inf, 1e-45, 65504.0]),
)
fractions = st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0))


@st.composite
def tensor_stats(draw: st.DrawFn) -> TensorStats | None:
    if draw(st.booleans()):
        return None
    count = draw(st.integers(min_value=0, max_value=1000))
    numel = count + draw(st.integers(min_value=0, max_value=10))
    std = abs(draw(floats))
    bins = draw(st.dictionaries(st.integers(min_value=-126, max_value=128), st.integers(0, 50), max_size=4))
    return ts(std, mean=draw(floats), count=count, numel=numel, exponents=exps(bins))


@st.composite
def layer(draw: st.DrawFn, i: int = 0) -> LayerStats:
    kind = draw(st.sampled_from(["Linear", "Conv2d", "ReLU", "Tanh", "Sigmoid", "BatchNorm2d", "LSTM", "Custom"]))
    shape = tuple(draw(st.lists(st.integers(min_value=0, max_value=8), max_size=4)))
    has_weight = draw(st.booleans())
    return LayerStats(
        name=draw(st.sampled_from(["a", "b.0", "b.1", "c.x-y", ""])),
        type=kind,
        step=0,
        call=draw(st.integers(0, 2)),
        shape=shape,
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16", "int64", ""])),
        activation=draw(tensor_stats()),
        gradient=draw(tensor_stats()),
        weight=draw(tensor_stats()) if has_weight else None,
        weight_grad=draw(tensor_stats()) if has_weight else None,
        weight_name="w" if has_weight else None,
        saturation=draw(fractions),
        bounds=(-1.0, 1.0),
        units=draw(st.one_of(st.none(), st.integers(0, 8))),
        dead_fraction=draw(fractions),
        rare_fraction=draw(fractions),
        never_active_fraction=draw(fractions),
        update_ratio=draw(st.one_of(st.none(), floats)),
    )


@settings(max_examples=150, deadline=None)
@given(layers=st.lists(layer(), max_size=12), ratios=st.lists(floats, max_size=8))
def test_diagnose_never_raises(layers: list[LayerStats], ratios: list[float]) -> None:
    n = len(ratios)
    h = history(
        layers={"a": {"dead_fraction": ratios}},
        params={"w": {"update_ratio": ratios, "weight_norm": ratios[::-1], "grad_norm": ratios}},
    )
    params = [ParamStats(name="w", shape=(2, 2), requires_grad=True, weight=ts(1.0, count=4))] if n % 2 else []
    found = diagnose(layers, params=params, history=h)
    for f in found:
        assert f.severity in ("info", "warning", "error")
        assert f.message
        assert all(isinstance(v, float) for v in f.evidence.values())
