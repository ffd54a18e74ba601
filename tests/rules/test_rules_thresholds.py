"""Each threshold of actdiag.rules.thresholds, on hand-built records just below, at and above it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from actdiag.fixes import attach_fixes
from actdiag.records import Finding, LayerStats, ParamStats
from actdiag.rules import DEFAULT_THRESHOLDS, Thresholds, diagnose
from tests.rules.factory import bounded, chain, exps, history, linear, relu, ts

T = DEFAULT_THRESHOLDS


def codes(layers: list[LayerStats], **kw: object) -> list[str]:
    return [f.code for f in diagnose(layers, **kw)]  # type: ignore[arg-type]


def with_fixes(layers: list[LayerStats], **kw: object) -> tuple[Finding, ...]:
    """The findings as a report shows them: diagnosed, then the fixes attached."""
    return attach_fixes(diagnose(layers, **kw), layers)  # type: ignore[arg-type]


def geometric(start: float, gain: float, n: int) -> list[float]:
    return [start * gain**i for i in range(n)]


# ------------------------------------------------------------------------------------------------ collapse/explosion
@pytest.mark.parametrize(("gain", "fires"), [(0.79, True), (0.81, False)])
def test_collapse_gain_default_threshold(gain: float, fires: bool) -> None:
    # 11 layers: the total shrink is far past 5x either way, so only the per-layer gain decides.
    assert ("activation_collapse" in codes(chain(geometric(1.0, gain, 11)))) is fires


@pytest.mark.parametrize(("gain", "fires"), [(0.25, True), (0.5, False), (0.75, False)])
def test_collapse_gain_at_threshold_is_quiet(gain: float, fires: bool) -> None:
    t = Thresholds(collapse_gain_below=0.5, collapse_total_below=1.0)
    assert ("activation_collapse" in codes(chain(geometric(1.0, gain, 6)), thresholds=t)) is fires


@pytest.mark.parametrize(("total", "fires"), [(0.125, True), (0.25, False), (0.5, False)])
def test_collapse_total_threshold(total: float, fires: bool) -> None:
    t = Thresholds(collapse_total_below=0.25, collapse_gain_below=1.0)
    stds = geometric(1.0, total**0.2, 6)
    stds[-1] = total  # exact
    assert ("activation_collapse" in codes(chain(stds), thresholds=t)) is fires


@pytest.mark.parametrize(("steps", "fires"), [(4, False), (5, True), (6, True)])
def test_collapse_needs_min_transitions(steps: int, fires: bool) -> None:
    assert T.spread_min_transitions == 5
    assert ("activation_collapse" in codes(chain(geometric(1.0, 0.3, steps + 1)))) is fires


def test_collapse_broken_by_a_normalisation_layer() -> None:
    """A norm layer resetting the spread breaks the run: no sustained shrinking, nothing to report."""
    layers = chain(geometric(1.0, 0.5, 3))
    norm = dataclasses.replace(linear("bn", 1.0), type="BatchNorm1d")
    layers += [norm, *chain(geometric(1.0, 0.5, 3))]
    layers[-3:] = [dataclasses.replace(lay, name=f"b{i}") for i, lay in enumerate(layers[-3:])]
    assert "activation_collapse" not in codes(layers)


def test_collapse_finding_names_run_and_evidence() -> None:
    # Weights of gain 0.5 (the factory's are Xavier's gain 1, and a fix equal to the current init is never offered).
    layers = [dataclasses.replace(lay, weight=ts(0.05, count=10000)) for lay in chain(geometric(2.0, 0.5, 6))[:-1]]
    (f,) = [f for f in with_fixes([*layers, chain([1.0])[-1]]) if f.code == "activation_collapse"]
    assert f.layer == "fc5"
    assert f.related == ("fc0", "fc1", "fc2", "fc3", "fc4")
    assert f.evidence["gain_per_layer"] == pytest.approx(0.5)
    assert f.evidence["first_std"] == 2.0
    assert f.evidence["last_std"] == pytest.approx(2.0 * 0.5**5)
    assert f.severity == "warning"
    assert [x.code for x in f.fixes][:2] == ["xavier_init", "batchnorm"]
    assert f.evidence["weight_gain"] == pytest.approx(0.5)


def test_no_init_fix_equal_to_the_current_init() -> None:
    """The factory's weights have Xavier's gain (sqrt(100) * 0.1 = 1): xavier_init is not offered for them."""
    (f,) = [f for f in with_fixes(chain(geometric(2.0, 0.5, 6))) if f.code == "activation_collapse"]
    assert f.evidence["weight_gain"] == pytest.approx(1.0)
    assert "xavier_init" not in [x.code for x in f.fixes]


@pytest.mark.parametrize(("gain", "fires"), [(1.24, False), (1.26, True)])
def test_explosion_gain_default_threshold(gain: float, fires: bool) -> None:
    assert ("activation_explosion" in codes(chain(geometric(1.0, gain, 11)))) is fires


@pytest.mark.parametrize(("gain", "fires"), [(1.5, False), (2.0, False), (4.0, True)])
def test_explosion_gain_at_threshold_is_quiet(gain: float, fires: bool) -> None:
    t = Thresholds(explosion_gain_above=2.0, explosion_total_above=1.0)
    assert ("activation_explosion" in codes(chain(geometric(1.0, gain, 6)), thresholds=t)) is fires


@pytest.mark.parametrize(("total", "fires"), [(4.0, False), (5.0, False), (8.0, True)])
def test_explosion_total_threshold(total: float, fires: bool) -> None:
    t = Thresholds(explosion_gain_above=1.0)
    stds = geometric(1.0, total**0.2, 6)
    stds[-1] = total
    assert ("activation_explosion" in codes(chain(stds), thresholds=t)) is fires


# --------------------------------------------------------------------------------------------------------- saturation
@pytest.mark.parametrize(("sat", "fires"), [(0.19, False), (0.2, True), (0.21, True)])
def test_saturation_threshold(sat: float, fires: bool) -> None:
    assert T.saturation_fraction_at_least == 0.2
    layers = [linear("fc", 1.0), bounded("act", sat), linear("head", 1.0)]
    assert ("saturation" in codes(layers)) is fires


def test_saturation_ignores_the_models_output_layer() -> None:
    layers = [linear("fc", 1.0), bounded("out", 0.99, kind="Sigmoid")]
    assert codes(layers) == []


def test_saturation_groups_layers_into_one_finding() -> None:
    layers = []
    for i, sat in enumerate([0.3, 0.6, 0.4]):
        layers += [linear(f"fc{i}", 1.0), bounded(f"act{i}", sat)]
    layers.append(linear("head", 1.0))
    (f,) = with_fixes(layers)
    assert f.code == "saturation"
    assert f.layer == "act1"
    assert set(f.related) == {"act0", "act2"}
    assert f.evidence["saturation"] == 0.6
    assert f.fixes[0].code == "xavier_init"
    assert "model.fc1.weight" in f.fixes[0].snippet


# ---------------------------------------------------------------------------------------------------------- dead relu
@pytest.mark.parametrize(("dead", "fires"), [(0.49, False), (0.5, False), (0.51, True)])
def test_dead_relu_threshold(dead: float, fires: bool) -> None:
    assert T.dead_fraction_above == 0.5
    layers = [linear("fc", 1.0), relu("act", dead), linear("head", 1.0)]
    assert ("dead_relu" in codes(layers)) is fires


@pytest.mark.parametrize(("dead", "severity"), [(0.98, "warning"), (0.99, "error"), (1.0, "error")])
def test_dead_relu_error_threshold(dead: float, severity: str) -> None:
    layers = [linear("fc", 1.0), relu("act", dead), linear("head", 1.0)]
    (f,) = [f for f in diagnose(layers) if f.code == "dead_relu"]
    assert f.severity == severity


@pytest.mark.parametrize(("batch", "fires"), [(7, False), (8, True), (9, True)])
def test_dead_relu_needs_enough_samples_per_unit(batch: int, fires: bool) -> None:
    assert T.dead_min_samples == 8
    layers = [linear("fc", 1.0, batch=batch), relu("act", 1.0, batch=batch), linear("head", 1.0, batch=batch)]
    assert ("dead_relu" in codes(layers)) is fires


def test_dead_relu_ignores_leaky_family() -> None:
    leaky = dataclasses.replace(relu("act", 1.0), type="LeakyReLU")
    assert codes([linear("fc", 1.0), leaky, linear("head", 1.0)]) == []


@pytest.mark.parametrize(("window", "fires"), [([0.9, 0.9, 0.9], True), ([0.9, 0.4, 0.9], False), ([0.9, 0.9], True)])
def test_dead_relu_over_window(window: list[float], fires: bool) -> None:
    """With a history of at least `dead_window` steps, units must have stayed dead over the whole window; a
    shorter history falls back to the latest step."""
    layers = [linear("fc", 1.0), relu("act", window[-1]), linear("head", 1.0)]
    h = history(layers={"act": {"dead_fraction": window}})
    found = [f for f in diagnose(layers, history=h) if f.code == "dead_relu"]
    assert bool(found) is fires
    if fires and len(window) >= T.dead_window:
        assert found[0].evidence["steps"] == T.dead_window


# ---------------------------------------------------------------------------------------------------------- gradients
def grad_chain(first: float, last: float, n: int = 4) -> list[LayerStats]:
    """Same activation std everywhere; gradient std from `first` (input side) to `last` (output side)."""
    grads = [first * (last / first) ** (i / (n - 1)) for i in range(n)]
    grads[-1] = last
    return chain([1.0] * n, grads)


@pytest.mark.parametrize(("ratio", "fires"), [(0.9e-3, True), (1e-3, False), (1.1e-3, False)])
def test_vanishing_ratio_threshold(ratio: float, fires: bool) -> None:
    assert T.vanishing_ratio_below == 1e-3
    t = dataclasses.replace(T, vanishing_abs_below=0.0)
    assert ("vanishing_gradient" in codes(grad_chain(ratio, 1.0), thresholds=t)) is fires


@pytest.mark.parametrize(("ratio", "fires"), [(69.0, False), (70.0, False), (71.0, True)])
def test_exploding_ratio_threshold(ratio: float, fires: bool) -> None:
    assert T.exploding_ratio_above == 70.0
    assert ("exploding_gradient" in codes(grad_chain(ratio, 1.0))) is fires


@pytest.mark.parametrize(("rms", "fires"), [(0.9e-7, True), (1.1e-7, False)])
def test_vanishing_absolute_threshold(rms: float, fires: bool) -> None:
    """Negligible gradients (SageMaker's 1e-7) count on their own: here the first layer holds 100x the elements of
    the others, so its gradient's norm is 1e-3 of the last one's or more and the ratio test stays quiet."""
    layers = [linear("fc0", 1.0, rms, width=1000, batch=100), *chain([1.0] * 3, [1e-4] * 3)]
    assert ("vanishing_gradient" in codes(layers)) is fires


def test_gradient_mirroring_activation_collapse_stands_and_names_its_cause() -> None:
    """Gradients shrink 1e4x towards the input while the activations shrink 21x a layer towards the output: the
    collapse is the cause, and the vanishing gradient is still reported, naming it."""
    stds = [1e4 ** (1 - i / 3) for i in range(4)]
    grads = [1e-4 ** (1 - i / 3) for i in range(4)]
    found = {f.code: f for f in diagnose(chain(stds, grads))}
    assert set(found) == {"activation_collapse", "vanishing_gradient"}
    assert "activation_collapse" in found["vanishing_gradient"].related
    assert found["vanishing_gradient"].evidence["ratio"] == pytest.approx(1e-4)


@pytest.mark.parametrize(("step", "fires"), [(0.24, True), (0.25, False), (0.26, False)])
def test_steep_collapse_over_few_layers(step: float, fires: bool) -> None:
    """Three weight layers (two steps), each shrinking the spread more than 4x, are a collapse on their own."""
    assert (T.collapse_steep_gain_below, T.spread_steep_min_transitions) == (0.25, 2)
    assert ("activation_collapse" in codes(chain(geometric(1.0, step, 3)))) is fires


@pytest.mark.parametrize(("step", "fires"), [(4.1, True), (4.0, False)])
def test_steep_explosion_over_few_layers(step: float, fires: bool) -> None:
    assert ("activation_explosion" in codes(chain(geometric(1.0, step, 3)))) is fires


def test_steep_fall_absorbed_by_the_next_normalisation_is_no_collapse() -> None:
    """A pre-norm residual branch initialised small (ViT's N(0, 0.02^2)): LayerNorm -> fc1 -> fc2 shrink 6-8x a
    layer, and the next LayerNorm rescales what reaches it."""
    norm = dataclasses.replace(linear("ln1", 1.0), type="LayerNorm")
    branch = [norm, linear("fc1", 0.16), linear("fc2", 0.02)]
    after = dataclasses.replace(linear("ln2", 1.0), type="LayerNorm")
    assert "activation_collapse" not in codes([*branch, after, *chain([1.0])])
    assert "activation_collapse" in codes([*branch, *chain([0.002])])


def test_one_steep_step_is_a_change_of_scale() -> None:
    """A single 100x drop (unnormalised inputs meeting the first layer) followed by steady layers is no collapse."""
    assert "activation_collapse" not in codes(chain([100.0, 1.0, 0.9, 0.85]))


def test_output_head_is_no_collapse_step() -> None:
    """Six layers shrinking 0.7x, then a head whose output is a tenth of that: the head does not extend the run."""
    layers = chain(geometric(1.0, 0.7, 5))[:-1]
    layers.append(linear("head", 0.01))
    assert "activation_collapse" not in codes(layers)
    assert "activation_collapse" in codes([*layers[:-1], linear("fc5", 0.01), linear("head", 0.01)])


def test_frozen_layers_without_gradients_are_not_vanishing() -> None:
    layers = chain([1.0] * 4, [1.0] * 4)
    frozen = [
        dataclasses.replace(lay, name=f"frozen{i}", gradient=None, weight_grad=None) for i, lay in enumerate(layers)
    ]
    assert codes(frozen + layers) == []


# ---------------------------------------------------------------------------------------------------------- nonfinite
def test_nonfinite_names_the_first_layer_in_execution_order() -> None:
    bad = ts(1.0, count=900, numel=1000)
    layers = [linear("a", 1.0), dataclasses.replace(linear("b", 1.0), activation=bad)]
    layers.append(dataclasses.replace(linear("c", 1.0), activation=bad))
    (f,) = with_fixes(layers)
    assert (f.code, f.layer, f.severity) == ("nonfinite", "b", "error")
    assert f.related == ("c",)
    assert f.evidence["nonfinite_count"] == 100
    assert "check_inputs" in [x.code for x in f.fixes]


def test_nonfinite_in_gradient_only() -> None:
    bad = ts(1.0, count=900, numel=1000)
    layers = [linear("a", 1.0, 1.0), dataclasses.replace(linear("b", 1.0, 1.0), gradient=bad), linear("c", 1.0, 1.0)]
    (f,) = with_fixes(layers)
    assert (f.code, f.layer, f.evidence["gradient"]) == ("nonfinite", "b", 1.0)
    assert "gradient_clipping" in [x.code for x in f.fixes]


def test_nonfinite_in_weights() -> None:
    p = ParamStats(name="fc.weight", shape=(10, 10), requires_grad=True, weight=ts(1.0, count=90, numel=100))
    (f,) = with_fixes([linear("fc", 1.0)], params=[p])
    assert (f.code, f.layer) == ("nonfinite", "fc")
    assert "lower_learning_rate" in [x.code for x in f.fixes]


# ---------------------------------------------------------------------------------------------------------- precision
def fp(layer: LayerStats, dtype: str, bins: dict[int, float], gradient: bool = False) -> LayerStats:
    count = int(sum(bins.values()))
    stats = ts(1.0, count=count, exponents=exps(bins))
    if gradient:
        return dataclasses.replace(layer, dtype=dtype, gradient=stats)
    return dataclasses.replace(layer, dtype=dtype, activation=stats)


@pytest.mark.parametrize(("dtype", "exponent", "severity"), [
    ("float32", 16, None),  # |x| in [32768, 65536): still fits float16
    ("float32", 17, "info"),  # |x| >= 65536: would overflow float16
    ("float16", 15, None),
    ("float16", 16, "warning"),  # within one doubling of 65504
    ("bfloat16", 17, None),  # bfloat16 has float32's range
])  # fmt: skip
def test_fp16_overflow_exponent_threshold(dtype: str, exponent: int, severity: str | None) -> None:
    layer = fp(linear("fc", 1.0), dtype, {1: 999, exponent: 1})
    found = [f for f in diagnose([layer, linear("head", 1.0)]) if f.code == "fp16_overflow"]
    assert (found[0].severity if found else None) == severity


@pytest.mark.parametrize(("tiny", "fires"), [(4, False), (5, False), (6, True)])
def test_fp16_underflow_fraction_threshold_half(tiny: int, fires: bool) -> None:
    assert T.fp16_underflow_fraction_above == 0.05
    # exponent -14: 2**-15 <= |g| < 2**-14, float16's subnormal range (precision lost, next to flushing)
    layer = fp(linear("fc", 1.0, 1.0), "float16", {-14: tiny, 0: 100 - tiny}, gradient=True)
    found = [f for f in with_fixes([layer, linear("head", 1.0, 1.0)]) if f.code == "fp16_underflow"]
    assert bool(found) is fires
    if fires:
        assert found[0].severity == "warning"
        assert [x.code for x in found[0].fixes] == ["loss_scaling", "bf16_autocast"]


@pytest.mark.parametrize(("tiny", "fires"), [(24, False), (25, False), (26, True)])
def test_fp16_underflow_fraction_threshold_float32(tiny: int, fires: bool) -> None:
    """A float32 gradient is noted when more than a quarter of it lies beyond float16's 40 binades below its
    largest value: no loss scale could keep it. Loss scaling is then no cure, bfloat16 is."""
    assert (T.fp16_underflow_info_fraction_above, T.fp16_scalable_span) == (0.25, 40)
    layer = fp(linear("fc", 1.0, 1.0), "float32", {-41: tiny, 0: 100 - tiny}, gradient=True)
    found = [f for f in with_fixes([layer, linear("head", 1.0, 1.0)]) if f.code == "fp16_underflow"]
    assert bool(found) is fires
    if fires:
        assert found[0].severity == "info"
        assert [x.code for x in found[0].fixes] == ["bf16_autocast"]
        assert "even with loss scaling" in found[0].message


def test_fp16_underflow_span_boundary() -> None:
    """Largest values in binade 0 (|g| < 1): values in binade -40 are within reach of a loss scale, -41 are not."""
    within = fp(linear("fc", 1.0, 1.0), "float32", {-40: 50, 0: 50}, gradient=True)
    beyond = fp(linear("fc", 1.0, 1.0), "float32", {-41: 50, 0: 50}, gradient=True)
    assert "fp16_underflow" not in codes([within, linear("head", 1.0, 1.0)])
    assert "fp16_underflow" in codes([beyond, linear("head", 1.0, 1.0)])


def test_fp16_underflow_quiet_for_a_float32_gradient_loss_scaling_saves() -> None:
    """Every value below 2**-24 but all within a few binades of each other: GradScaler lifts them all into range."""
    tiny = fp(linear("fc", 1.0, 1.0), "float32", {-30: 50, -28: 50}, gradient=True)
    assert "fp16_underflow" not in codes([tiny, linear("head", 1.0, 1.0)])


def test_fp16_underflow_float32_activations_only_where_autocast_computes_in_half() -> None:
    """Tiny float32 outputs of a Linear would flush under float16 autocast; those of an elementwise layer (a layer
    scale, an activation) stay float32 under autocast and are not reported."""
    lin = fp(linear("fc", 1.0), "float32", {-30: 100})
    scale = dataclasses.replace(fp(linear("scale", 1.0), "float32", {-30: 100}), type="LayerScale")
    assert "fp16_underflow" in codes([lin, linear("head", 1.0)])
    assert "fp16_underflow" not in codes([scale, linear("head", 1.0)])


# ------------------------------------------------------------------------------------------------------------ updates
def with_update(ratio: float, grad_norm: float = 1.0) -> list[LayerStats]:
    layer = dataclasses.replace(linear("fc", 1.0, 1.0), update_ratio=ratio)
    if grad_norm == 0:
        layer = dataclasses.replace(layer, weight_grad=ts(0.0, count=100))
    return [layer, linear("head", 1.0, 1.0)]


@pytest.mark.parametrize(("ratio", "fires"), [(0.09, False), (0.1, False), (0.11, True)])
def test_large_updates_threshold(ratio: float, fires: bool) -> None:
    assert T.update_ratio_above == 0.1
    assert ("large_updates" in codes(with_update(ratio))) is fires


@pytest.mark.parametrize(("ratio", "fires"), [(0.9e-6, True), (1e-6, False), (1.1e-6, False)])
def test_stalled_updates_threshold(ratio: float, fires: bool) -> None:
    assert T.update_ratio_below == 1e-6
    assert ("stalled_updates" in codes(with_update(ratio))) is fires


def test_stalled_updates_ignore_embeddings() -> None:
    """An embedding table only moves the rows of the batch's tokens: a tiny ratio over the table is by design."""
    layers = with_update(1e-8)
    layers[0] = dataclasses.replace(layers[0], type="Embedding")
    assert "stalled_updates" not in codes(layers)


def test_fp16_overflow_seen_in_an_earlier_recorded_step() -> None:
    """watch reads the last few recorded steps' exponent histograms: a spike between two reads is not missed."""
    layer = fp(linear("fc", 1.0), "float16", {1: 1000})
    spike = exps({1: 999, 16: 1})
    h = dataclasses.replace(history(), activation_exponents={"fc": (spike, exps({1: 1000}))})
    assert "fp16_overflow" not in codes([layer, linear("head", 1.0)])
    assert "fp16_overflow" in codes([layer, linear("head", 1.0)], history=h)


def test_stalled_updates_not_blamed_on_the_optimizer_when_the_gradient_is_zero() -> None:
    assert "stalled_updates" not in codes(with_update(0.0, grad_norm=0.0))


def adagrad_history(
    steps: int, final_decay: float, ratio_end: float, lr: float | None = None
) -> dict[str, dict[str, list[float]]]:
    """Update ratios falling while the gradient/weight ratio stays: the effective step (and the update) decay to
    `final_decay` of the first at the last two points."""
    eff = [1.0 + (final_decay - 1.0) * min(i, steps - 2) / (steps - 2) for i in range(steps)]
    ratio = [ratio_end * e / final_decay for e in eff]
    series = {"update_ratio": ratio, "weight_norm": [1.0] * steps, "grad_norm": [1.0] * steps}
    if lr is not None:
        series["lr"] = [lr] * steps
    return {"fc.weight": series}


def adagrad_params(kind: str | None, lr: float = 0.01) -> list[ParamStats]:
    return [ParamStats(name="fc.weight", shape=(100, 100), requires_grad=True, weight=ts(0.1), lr=lr, optimizer=kind)]


@pytest.mark.parametrize(("decay", "fires"), [(0.09, True), (0.11, False)])
def test_stall_trend_decay_threshold(decay: float, fires: bool) -> None:
    assert T.stall_decay_below == 0.1
    layers = with_update(5e-5)
    h = history(params=adagrad_history(T.min_history, decay, 5e-5))
    found = [f for f in with_fixes(layers, history=h) if f.code == "stalled_updates"]
    assert bool(found) is fires
    if fires:
        assert found[0].evidence["effective_step_decay"] == pytest.approx(decay)
        assert found[0].fixes[0].code == "switch_optimizer"


@pytest.mark.parametrize(("ratio", "fires"), [(0.9e-3, True), (1e-3, False), (1.1e-3, False)])
def test_stall_trend_ratio_threshold_without_a_known_optimizer(ratio: float, fires: bool) -> None:
    layers = with_update(ratio)
    h = history(params=adagrad_history(T.min_history, 0.01, ratio))
    assert ("stalled_updates" in codes(layers, history=h)) is fires


@pytest.mark.parametrize(("decay", "fires"), [(0.19, True), (0.21, False)])
def test_stall_trend_threshold_under_adagrad(decay: float, fires: bool) -> None:
    assert T.accumulating_decay_below == 0.2
    h = history(params=adagrad_history(T.min_history, decay, 3e-3, lr=0.01))
    found = diagnose(with_update(3e-3), params=adagrad_params("Adagrad"), history=h)
    assert ("stalled_updates" in [f.code for f in found]) is fires


@pytest.mark.parametrize(("kind", "fires"), [("Adagrad", True), ("Adam", False), ("RMSprop", False), ("SGD", False)])
def test_stall_trend_only_under_an_optimizer_whose_step_decays(kind: str, fires: bool) -> None:
    """The same fivefold fall, with healthy ratios (3e-3): a stall under way for AdaGrad, nothing for the others."""
    layers = with_update(3e-3)
    h = history(params=adagrad_history(T.min_history, 0.19, 3e-3, lr=0.01))
    found = [f for f in with_fixes(layers, params=adagrad_params(kind), history=h) if f.code == "stalled_updates"]
    assert bool(found) is fires
    if fires:
        assert "Adagrad's effective step" in found[0].message
        assert [x.code for x in found[0].fixes] == ["switch_optimizer", "raise_learning_rate"]


@pytest.mark.parametrize(("points", "fires"), [(3, False), (4, True)])
def test_stall_trend_needs_history(points: int, fires: bool) -> None:
    assert T.min_history == 4
    h = history(params=adagrad_history(points, 0.01, 5e-5))
    assert ("stalled_updates" in codes(with_update(5e-5), history=h)) is fires


def test_stall_trend_must_hold_at_the_last_two_points() -> None:
    series = adagrad_history(6, 0.01, 5e-5)
    series["fc.weight"]["update_ratio"][-2] = 5e-3  # back to half the first step just before
    assert "stalled_updates" not in codes(with_update(5e-5), history=history(params=series))


def test_a_decayed_schedule_is_no_stall() -> None:
    """A ratio of 5e-7 at an lr decayed to 1e-3 of its peak: at the peak it would be 5e-4, a healthy step."""
    series = {"fc.weight": {"update_ratio": [5e-4, 5e-5, 5e-7], "lr": [1.0, 0.1, 1e-3]}}
    params = adagrad_params("SGD", lr=1e-3)
    assert "stalled_updates" not in codes(with_update(5e-7), params=params, history=history(params=series))
    params = adagrad_params("SGD", lr=1.0)  # the same ratio at an lr that did not decay is a stall
    flat = {"fc.weight": {"update_ratio": [5e-7] * 3, "lr": [1.0] * 3}}
    (f,) = [f for f in with_fixes(with_update(5e-7), params=params, history=history(params=flat))]
    assert f.code == "stalled_updates" and [x.code for x in f.fixes] == ["raise_learning_rate"]


def test_a_learning_rate_of_zero_is_no_stall() -> None:
    params = adagrad_params("AdamW", lr=0.0)
    assert "stalled_updates" not in codes(with_update(0.0), params=params)


@pytest.mark.parametrize(("step", "fires"), [(0.09, False), (0.1, False), (0.11, True)])
def test_near_zero_parameter_judged_by_absolute_step(step: float, fires: bool) -> None:
    """A gain that started at zero, now at RMS 0.01, moved by `step` per element: its ratio (step / 0.01) is 9-11,
    far above 0.1 either way, so only the absolute size decides."""
    assert (T.update_abs_above, T.near_zero_rms_below) == (0.1, 1e-3)
    layers = with_update(step / 0.01)
    layers[0] = dataclasses.replace(layers[0], weight=ts(0.01, count=100))
    h = history(params={"fc.weight": {"weight_norm": [0.0, 0.1]}})
    found = [f for f in diagnose(layers, history=h) if f.code in ("large_updates", "stalled_updates")]
    assert [f.code for f in found] == (["large_updates"] if fires else [])
    if fires:
        assert found[0].evidence["update_rms"] == pytest.approx(step)


def test_converging_sgd_is_not_stalled() -> None:
    """Plain SGD: updates shrink with the gradient, the effective step stays put. That is convergence."""
    n = 8
    grad = [10.0 ** (-i / 2) for i in range(n)]  # the update ratio ends at 3e-5, below the trend rule's 1e-3
    ratio = [0.1 * g for g in grad]
    h = history(params={"fc.weight": {"update_ratio": ratio, "weight_norm": [1.0] * n, "grad_norm": grad}})
    assert "stalled_updates" not in codes(with_update(ratio[-1]), history=h)


# ------------------------------------------------------------------------------------------------------------ ranking
def test_ranking_puts_errors_and_root_causes_first() -> None:
    bad = ts(1.0, count=900, numel=1000)
    layers = [*chain(geometric(1.0, 0.5, 6)), relu("act", 0.8), linear("nanlayer", 1.0), linear("head", 1.0)]
    layers[-2] = dataclasses.replace(layers[-2], activation=bad)
    found = diagnose(layers)
    assert [f.code for f in found] == ["nonfinite", "activation_collapse", "dead_relu"]
    assert [f.severity for f in found] == ["error", "warning", "warning"]


def test_thresholds_are_documented() -> None:
    """Every threshold has a docstring-style note on where it comes from (kept next to it in the source)."""
    import inspect as pyinspect

    from actdiag.rules import thresholds

    source = pyinspect.getsource(thresholds)
    for field in dataclasses.fields(Thresholds):
        after = source.split(f"    {field.name}:", 1)[1]
        note = after.split('"""', 2)[1]
        assert len(note.split()) >= 8, field.name
    assert not math.isnan(T.vanishing_abs_below)
