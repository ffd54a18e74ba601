"""Activation rules: collapse and explosion of the spread across depth, saturation, dead ReLUs."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from actdiag.metrics import DEAD_FRACTION
from actdiag.records import Finding, History, LayerStats
from actdiag.rules._common import (
    ACTIVATION_TYPES,
    DEAD_CAPABLE,
    NORM_TYPES,
    REINIT_TYPES,
    SIGMOID_LIKE,
    TANH_LIKE,
    finite,
    fmt,
    geo_mean,
    others_than,
    output_indices,
    usable,
)
from actdiag.rules.thresholds import DEFAULT_THRESHOLDS, Thresholds


@dataclass(frozen=True, slots=True)
class _Point:
    index: int  # position in the step's layers
    layer: LayerStats
    std: float


def spread_chain(layers: Sequence[LayerStats]) -> list[_Point]:
    """The outputs of the layers that own a weight, in execution order, with their std.

    Linear maps are where Xavier/He theory predicts the gain, and normalisation layers (which own weights too)
    stay in the chain because they reset the spread. Activation modules are left out: whether the network uses
    `nn.ReLU` or `F.relu` must not change the verdict. Layers with no spread (a dead layer, a constant) break the
    chain rather than count as a collapse: dead units are their own finding.
    """
    chain = [
        _Point(i, layer, layer.activation.std)  # type: ignore[union-attr]
        for i, layer in enumerate(layers)
        if layer.weight_name is not None and usable(layer.activation)
    ]
    if chain and is_head(layers, chain[-1].index):
        chain.pop()
    # Every call of a head applied several times (flagged from the graph, `LayerStats.output`), not only the last.
    return [p for p in chain if not (p.layer.output and is_head(layers, p.index))]


def is_head(layers: Sequence[LayerStats], index: int) -> bool:
    """Whether the weight layer at `index` is the model's output head: a linear map (Linear, Conv) after which no
    activation and no other weight layer runs. Its output is sized by the task (ten logits, one score), not by the
    layers before it, so its spread is no step of a collapse or an explosion. A call the recorder flagged as the
    output (`LayerStats.output`) is judged up to the next weight layer only, and a bounded activation flagged with it
    (a classifier's sigmoid) is part of the head."""
    if layers[index].type not in REINIT_TYPES:
        return False
    if layers[index].output:
        for lay in layers[index + 1 :]:
            if lay.weight_name is not None:
                break
            if lay.type in ACTIVATION_TYPES and not (lay.output and lay.type in TANH_LIKE | SIGMOID_LIKE):
                return False
        return True
    return all(lay.weight_name is None and lay.type not in ACTIVATION_TYPES for lay in layers[index + 1 :])


def _runs(chain: list[_Point], shrinking: bool) -> list[list[_Point]]:
    """Maximal stretches of the chain where every step moves the spread the same way."""
    runs: list[list[_Point]] = []
    current: list[_Point] = chain[:1]
    for prev, point in zip(chain, chain[1:]):
        moving = point.std < prev.std if shrinking else point.std > prev.std
        if moving:
            current.append(point)
        else:
            if len(current) > 1:
                runs.append(current)
            current = [point]
    if len(current) > 1:
        runs.append(current)
    return runs


def _fans(layer: LayerStats) -> tuple[int, int] | None:
    """(fan_in, output units) of a plain linear map's weight, from its output shape and weight size."""
    w = layer.weight
    if layer.type not in REINIT_TYPES or w is None or w.count == 0 or not layer.shape:
        return None
    out_dim = 1 if layer.type.startswith("Conv") and len(layer.shape) >= 3 else len(layer.shape) - 1
    out_units = layer.shape[out_dim] if len(layer.shape) > out_dim else 0
    if out_units <= 0 or w.numel % out_units:
        return None
    return w.numel // out_units, out_units


def weight_gain(layer: LayerStats) -> float | None:
    """The std gain the layer's weights give a unit-variance input: sqrt(fan_in * E[w^2]). Xavier init makes it
    about 1, He init sqrt(2); None where the layer is not a plain linear map."""
    fans = _fans(layer)
    if fans is None or layer.weight is None:
        return None
    return math.sqrt(fans[0]) * layer.weight.rms


def init_gain(layer: LayerStats, code: str, nonlinearity: str) -> float | None:
    """The gain `weight_gain` would measure after the fix `code` ("he_init" or "xavier_init", as actdiag's snippets
    apply them: kaiming_normal_ in fan_in mode, xavier_normal_ with tanh's gain 5/3 before tanh)."""
    fans = _fans(layer)
    if fans is None:
        return None
    fan_in, out_units = fans
    if code == "he_init":
        return math.sqrt(2.0)
    if code == "xavier_init":
        # A convolution's fan_out also counts its kernel: taken as its fan_in, which it is for square layers.
        fan_out = out_units if not layer.type.startswith(("Conv", "LazyConv")) else fan_in
        gain = 5.0 / 3.0 if nonlinearity == "tanh" else 1.0
        return gain * math.sqrt(2.0 * fan_in / (fan_in + fan_out))
    return None


def already_initialised(
    layers: Sequence[LayerStats], code: str, nonlinearities: Sequence[str], t: Thresholds = DEFAULT_THRESHOLDS
) -> bool:
    """Whether every one of `layers` already has the weight gain that the init fix `code` would give it (within
    `t.init_match_ratio`): suggesting it would suggest what the model already does."""
    pairs = [(weight_gain(lay), init_gain(lay, code, nl)) for lay, nl in zip(layers, nonlinearities)]
    if not pairs or any(m is None or e is None or m <= 0 or e <= 0 for m, e in pairs):
        return False
    return all(max(m / e, e / m) <= t.init_match_ratio for m, e in pairs)  # type: ignore[operator]


# What may run between two linear maps of a plain feed-forward stack: its activation, dropout, a reshape.
_PLAIN_BETWEEN = ACTIVATION_TYPES | {"Dropout", "Dropout1d", "Dropout2d", "Identity", "Flatten", "Unflatten"}


def _plain_link(layers: Sequence[LayerStats], a: _Point, b: _Point) -> bool:
    """Whether `b` is the next linear map after `a` in a plain feed-forward stack (Linear/Conv, then only an
    activation, dropout or a reshape): the setting where a layer's gain alone sets the next layer's spread. Inside
    residual and normalised blocks the execution order crosses the block's structure (a branch's last layer, then
    the sum with the skip), so one step there says nothing about the signal."""
    if a.layer.type not in REINIT_TYPES or b.layer.type not in REINIT_TYPES:
        return False
    return all(lay.type in _PLAIN_BETWEEN for lay in layers[a.index + 1 : b.index])


def _steep(layers: Sequence[LayerStats], run: list[_Point], shrinking: bool, t: Thresholds) -> list[_Point] | None:
    """The longest stretch of `run` in which every layer of a plain stack alone shrinks (grows) the spread by more
    than the steep per-layer factor, if it spans enough layers; else None."""
    best: list[_Point] = []
    current: list[_Point] = run[:1]
    for prev, point in zip(run, run[1:]):
        step = point.std / prev.std
        steep = step < t.collapse_steep_gain_below if shrinking else step > 1.0 / t.collapse_steep_gain_below
        current = [*current, point] if steep and _plain_link(layers, prev, point) else [point]
        if len(current) > len(best):
            best = current
    return best if len(best) - 1 >= t.spread_steep_min_transitions else None


def _trend(
    layers: Sequence[LayerStats], chain: list[_Point], run: list[_Point], shrinking: bool, t: Thresholds
) -> list[_Point] | None:
    """The stretch of `run` that is a collapse (explosion), or None: a sustained drift over many layers, or a steep
    one over a few that no normalisation layer absorbs right after it."""
    steps = len(run) - 1
    if steps >= t.spread_min_transitions:
        total = run[-1].std / run[0].std
        gain = total ** (1.0 / steps)  # the geometric mean of the step-by-step ratios (they telescope)
        if shrinking and gain < t.collapse_gain_below and total < t.collapse_total_below:
            return run
        if not shrinking and gain > t.explosion_gain_above and total > t.explosion_total_above:
            return run
    steep = _steep(layers, run, shrinking, t)
    if steep is None:
        return None
    # A residual branch initialised small (BERT/ViT's N(0, 0.02^2) in a pre-norm block) shrinks the spread steeply
    # inside the branch, and the next normalisation rescales whatever reaches it: the signal is not lost.
    after = next((p for p in chain if p.index > steep[-1].index), None)
    if after is not None and after.layer.type in NORM_TYPES:
        return None
    return steep


def spread_findings(layers: Sequence[LayerStats], t: Thresholds) -> list[Finding]:
    chain = spread_chain(layers)
    found: list[Finding] = []
    for shrinking in (True, False):
        for whole in _runs(chain, shrinking):
            run = _trend(layers, chain, whole, shrinking, t)
            if run is None:
                continue
            steps = len(run) - 1
            total = run[-1].std / run[0].std
            gain = total ** (1.0 / steps)
            first, last = run[0].layer, run[-1].layer
            evidence: dict[str, float] = {
                "gain_per_layer": gain,
                "layers": float(len(run)),
                "first_std": run[0].std,
                "last_std": run[-1].std,
                "total_ratio": total,
            }
            wg = [g for g in (weight_gain(p.layer) for p in run) if g is not None and g > 0]
            if wg:
                evidence["weight_gain"] = geo_mean(wg)
            code = "activation_collapse" if shrinking else "activation_explosion"
            verb = "shrinks" if shrinking else "grows"
            # The backward pass mirrors the forward one through the same weights: the gradient shrinks (grows)
            # towards the input as the activations shrink (grow) towards the output (reported on its own too, as
            # vanishing/exploding_gradient linked to this finding).
            echo = ""
            g_first, g_last = first.gradient, last.gradient
            if g_first is not None and g_last is not None and g_first.count and g_last.count and g_last.rms > 0:
                evidence["gradient_ratio"] = g_first.rms / g_last.rms
                if evidence["gradient_ratio"] < 0.1 or evidence["gradient_ratio"] > 10:
                    echo = (
                        f" (and so the gradient at layer {first.label} is {fmt(evidence['gradient_ratio'])} times the "
                        f"one at layer {last.label})"
                    )
            message = (
                f"The spread of activations {verb} by {fmt(gain)}x per layer over {len(run)} layers, from std "
                f"{fmt(run[0].std)} at layer {first.label} to {fmt(run[-1].std)} at layer {last.label}: the "
                f"initialisation does not keep the signal's variance across depth{echo}."
            )
            found.append(
                Finding(
                    code=code,
                    severity="warning",
                    layer=last.name,
                    message=message,
                    evidence=evidence,
                    related=tuple(dict.fromkeys(p.layer.name for p in run[:-1] if p.layer.name != last.name)),
                )
            )
    return found


def saturation_findings(layers: Sequence[LayerStats], t: Thresholds) -> list[Finding]:
    """Bounded activations piling up at their bounds. The model's final layer is left out: a sigmoid/tanh output
    that saturates is a confident prediction, and its loss (BCE, for one) usually cancels the flat gradient."""
    head = output_indices(layers)
    hits = [
        layer
        for i, layer in enumerate(layers)
        if i not in head and finite(layer.saturation) and layer.saturation >= t.saturation_fraction_at_least  # type: ignore[operator]
    ]
    if not hits:
        return []
    worst = max(hits, key=lambda lay: lay.saturation or 0.0)
    sat = worst.saturation or 0.0
    lo, hi = worst.bounds or (math.nan, math.nan)
    others = f" and {len(hits) - 1} more layer(s)" if len(hits) > 1 else ""
    message = (
        f"{sat:.0%} of the outputs of layer {worst.label} ({worst.type}){others} sit at the bounds "
        f"{fmt(lo)}/{fmt(hi)}, where the gradient is nearly zero: the pre-activations are too large."
    )
    evidence = {
        "saturation": sat,
        "layers": float(len(hits)),
        "mean_saturation": sum(h.saturation or 0.0 for h in hits) / len(hits),
    }
    return [
        Finding(
            code="saturation",
            severity="warning",
            layer=worst.name,
            message=message,
            evidence=evidence,
            related=tuple(dict.fromkeys(h.name for h in hits if h.name != worst.name)),
        )
    ]


def samples_per_unit(layer: LayerStats) -> float:
    """How many values each unit of the layer outputs per call (batch and positions): a unit seen on few cannot be
    called dead."""
    if not layer.units or not layer.shape:
        return 0.0
    return math.prod(layer.shape) / layer.units


def _window(history: History | None, label: str, metric: str, n: int) -> list[float] | None:
    if history is None:
        return None
    series = history.layers.get(label, {}).get(metric)
    if not series:
        return None
    values = [v for v in series if finite(v)]
    return values[-n:] if len(values) >= n else None


def dead_relu_findings(layers: Sequence[LayerStats], history: History | None, t: Thresholds) -> list[Finding]:
    """ReLU units with no positive output for any sample. With a history (watch), a layer is reported when its
    units stayed dead for `dead_window` recorded steps; with one step, when they are dead in that step."""
    hits: list[tuple[LayerStats, float, float]] = []  # layer, dead share, recorded steps it held
    for layer in layers:
        if layer.type not in DEAD_CAPABLE or layer.dead_fraction is None:
            continue
        if samples_per_unit(layer) < t.dead_min_samples:
            continue
        window = _window(history, layer.label, DEAD_FRACTION, t.dead_window)
        if window is not None:
            held = min(window)
            never = layer.never_active_fraction
            share = min(held, never) if never is not None else held
            if share > t.dead_fraction_above:
                hits.append((layer, share, float(len(window))))
        elif layer.dead_fraction > t.dead_fraction_above:
            hits.append((layer, layer.dead_fraction, 1.0))
    if not hits:
        return []
    worst, share, steps = max(hits, key=lambda h: h[1])
    others = f" ({len(hits) - 1} more layer(s) too)" if len(hits) > 1 else ""
    span = f" for {int(steps)} recorded steps" if steps > 1 else ""
    message = (
        f"{share:.0%} of the {worst.units} units of layer {worst.label} output zero for every sample{span}{others}: "
        "they pass no gradient and no longer learn."
    )
    evidence = {"dead_fraction": share, "units": float(worst.units or 0), "layers": float(len(hits))}
    if steps > 1:
        evidence["steps"] = steps
    return [dead_relu_finding(worst, share, message, evidence, [h[0].name for h in hits], t)]


def dead_relu_finding(
    worst: LayerStats, share: float, message: str, evidence: Mapping[str, Any], named: Iterable[str], t: Thresholds
) -> Finding:
    """The dead-unit finding at layer `worst` (`share` of its units dead; `named`: every layer with dead units), for
    the one-step check here and the run's check (rules/run.py) alike."""
    if worst.rare_fraction is not None:
        evidence = {**evidence, "rare_fraction": worst.rare_fraction}
    return Finding(
        code="dead_relu",
        severity="error" if share >= t.dead_error_at_least else "warning",
        layer=worst.name,
        message=message,
        evidence=evidence,
        related=others_than(worst.name, named),
    )
