"""Every number the rules compare against, in one place, each with where it comes from.

Change them per run with `diagnose(..., thresholds=Thresholds(saturation_fraction=0.3))` (or
`dataclasses.replace(DEFAULT_THRESHOLDS, ...)`). A comparison named `*_above` fires strictly above the value,
`*_below` strictly below it, `*_at_least` at or above it; the tests check each one just below, at and above.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The thresholds of the rules. Defaults are chosen so that healthy models stay quiet (see tests/zoo.py)."""

    # --- gradients (rules/gradients.py) -------------------------------------------------------------------------
    vanishing_ratio_below: float = 1e-3
    """First-layer / last-layer gradient ratio under which gradients vanish. AUTOTRAINER (Zhang et al., ICSE 2021)
    flags vanishing gradients when the first layer's gradient norm is under 1e-3 of the last layer's."""

    exploding_ratio_above: float = 70.0
    """First-layer / last-layer gradient ratio above which gradients explode: AUTOTRAINER's exploding-gradient
    threshold (first-layer gradient norm more than 70 times the last layer's)."""

    unexplained_ratio: float = 10.0
    """How far the gradient ratio must also stay from 1 once the activation scale is factored out
    (||g||*||y|| per layer; for ReLU/linear layers this product is what a healthy backward pass conserves).
    If the forward signal itself shrank or grew by the same factor, the root cause is activation collapse or
    explosion and it is reported as that, not twice. One order of magnitude: measured here, the products of
    healthy controls stay within 3x of each other."""

    vanishing_abs_below: float = 1e-7
    """Per-element RMS gradient under which a layer's gradient is negligible outright. SageMaker Debugger's
    VanishingGradient rule uses a mean absolute gradient of 1e-7 as its default threshold."""

    # --- activations (rules/activations.py) ---------------------------------------------------------------------
    spread_min_transitions: int = 4
    """Collapse/explosion needs the spread to keep moving the same way over at least this many successive weight
    layers (5 layers, 4 steps between them): one small or large layer is not a trend. A 4-layer MLP with PyTorch's
    default initialisation shrinks by about 2.4x per layer, but three steps of it train fine in practice."""

    collapse_gain_below: float = 0.8
    """Geometric-mean per-layer std gain under which the spread collapses. Xavier/He theory keeps the gain at 1;
    measured here, Xavier-initialised tanh MLPs settle at a gain of 0.9 to 1.0, while N(0, 0.01^2) tanh at width
    4096 loses 0.64 per layer and Xavier init before ReLU 0.71 per layer (He et al. 2015: the missing factor 2)."""

    explosion_gain_above: float = 1.25
    """Geometric-mean per-layer std gain above which the spread explodes (the mirror image of collapse)."""

    collapse_total_below: float = 0.2
    """The whole run must also shrink the spread at least 5x (last/first std under 0.2): N(0, 0.01^2) tanh at width
    4096 shrinks it 9x over six layers; Xavier tanh shrinks it under 2x."""

    explosion_total_above: float = 5.0
    """The whole run must also grow the spread at least 5x (mirror of `collapse_total_below`)."""

    saturation_fraction_at_least: float = 0.2
    """Share of a bounded activation's outputs within 0.01 of a bound (tanh |y| >= 0.99, gradient under 2% of its
    peak) at which the layer counts as saturated. Measured here at width 4096: tanh with N(0, 0.05^2) weights
    saturates 32-42% of its outputs, Xavier with tanh gain 5/3 at most 12% (first layer), plain Xavier under 1%;
    Glorot & Bengio (2010) describe the saturated regime this catches."""

    dead_fraction_above: float = 0.5
    """Share of a ReLU layer's units with no positive output for any sample above which the layer is reported.
    SageMaker Debugger's DeadRelu rule flags a layer when more than 50% of its units are inactive
    (threshold_layer=50%, a unit being inactive when active in under 1% of samples)."""

    dead_error_at_least: float = 0.99
    """Dead share at which the whole layer is dead (no gradient reaches anything before it): an error."""

    dead_min_samples: int = 8
    """Samples per unit needed before a unit can be called dead: a healthy unit is silent on n samples with
    probability 2**-n, so with 8 samples at most ~0.4% of healthy units look dead (a batch of 1 proves nothing)."""

    dead_window: int = 3
    """Recorded steps over which units must stay dead for the training-time (watch) version of the rule."""

    # --- precision (rules/precision.py) -------------------------------------------------------------------------
    fp16_overflow_exponent: int = 16
    """Values with |x| >= 2**(e-1) = 32768 are within a factor 2 of float16's largest finite value 65504
    (IEEE 754 binary16): one more doubling overflows to Inf."""

    fp16_overflow_fraction_above: float = 0.0
    """Any value at risk of float16 overflow is reported: a single Inf poisons the whole step."""

    fp16_underflow_exponent: int = -23
    """Values with |x| < 2**-24 (exponent bin below -23) flush to zero in float16 (smallest subnormal 2**-24).
    Micikevicius et al. (2018, "Mixed precision training") show gradients in this range are lost without loss
    scaling."""

    fp16_underflow_fraction_above: float = 0.05
    """Share of a tensor's non-zero values that would flush to zero above which it is reported. Chosen here: a few
    stray tiny values are harmless, a twentieth of a layer's gradient is not (Micikevicius et al. 2018 show the
    gradients that fall below float16's range are what loss scaling exists to save)."""

    # --- updates (rules/updates.py) -----------------------------------------------------------------------------
    update_ratio_above: float = 0.1
    """||dW||/||W|| per step above which updates are too large. Karpathy's CS231n notes put a healthy ratio near
    1e-3; 100 times that rewrites a tenth of a layer's weights every step."""

    update_ratio_below: float = 1e-6
    """||dW||/||W|| per step under which a layer has stalled outright (a thousandth of CS231n's healthy 1e-3)."""

    stall_decay_below: float = 0.05
    """Training-time rule: the optimizer's effective step (update ratio divided by gradient/weight ratio) has fallen
    under this share of its largest value in the history while updates are also below `stall_ratio_below`.
    AdaGrad's effective learning rate lr/sqrt(sum of squared gradients) decays like this by construction
    (Duchi et al. 2011; Zeiler 2012 introduced Adadelta to stop it)."""

    stall_ratio_below: float = 1e-4
    """Update ratio under which a decaying effective step counts as stalled (ten times below CS231n's 1e-3)."""

    min_history: int = 5
    """Recorded steps needed before trend-based update rules speak."""


DEFAULT_THRESHOLDS = Thresholds()
