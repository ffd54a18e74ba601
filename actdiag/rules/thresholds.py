"""Every number the rules compare against, in one place, each with where it comes from.

Change them per run with `actdiag.inspect(..., thresholds=Thresholds(saturation_fraction_at_least=0.3))`,
`actdiag.watch(..., thresholds=...)` or `diagnose(..., thresholds=...)` (a plain dict of names to numbers works too,
and `dataclasses.replace(DEFAULT_THRESHOLDS, ...)`); on the command line with `--threshold NAME=VALUE`, or in a
project's pyproject.toml under `[tool.actdiag.thresholds]`. A comparison named `*_above` fires strictly above the
value, `*_below` strictly below it, `*_at_least` at or above it; the tests check each one just below, at and above.

The helpers at the end of this file (`make_thresholds`, `parse_threshold_option`, `find_pyproject`,
`pyproject_thresholds`) read the fields of `Thresholds` and nothing else, so a field added to the dataclass is
settable everywhere at once.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


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

    vanishing_abs_below: float = 1e-7
    """Per-element RMS gradient under which a layer's gradient is negligible outright. SageMaker Debugger's
    VanishingGradient rule uses a mean absolute gradient of 1e-7 as its default threshold."""

    # --- activations (rules/activations.py) ---------------------------------------------------------------------
    spread_min_transitions: int = 5
    """Collapse/explosion needs the spread to keep moving the same way over at least this many successive weight
    layers (6 layers, 5 steps between them): one small or large layer is not a trend. PyTorch's default
    initialisation shrinks the spread by about 0.6x per ReLU layer; measured here, LeNet-5 (five weight layers)
    loses 7-10x that way and trains fine, while the classic six-layer N(0, 0.01^2) tanh MLP must be reported."""

    init_match_ratio: float = 1.1
    """How close (as a ratio) a layer's measured weight gain sqrt(fan_in) * RMS(w) must be to the gain an
    initialisation fix would give it for the model to count as already initialised that way, and the fix is not
    suggested. Xavier (gain 1), He (sqrt 2) and Xavier with tanh's gain (5/3) are at least 18% apart, and PyTorch's
    default (1/sqrt 3) further still; a sampled RMS is within a few percent."""

    collapse_steep_gain_below: float = 0.25
    """A collapse over only a few layers of a plain feed-forward stack (linear maps with only an activation between
    them): every layer alone shrinks the spread by more than 4x (an explosion: grows it by more than 4x). The
    lecture's 5 x 100 ReLU MLP with N(0, 0.01^2) weights shrinks it ~14x a layer; PyTorch's default initialisation
    keeps 0.4-0.6 of it a layer before ReLU, and sigmoid's slope of at most 1/4 is the textbook limit of a layer
    that merely attenuates, so a steeper fall is neither a default nor a side effect."""

    spread_steep_min_transitions: int = 2
    """Layer-to-layer steps (three weight layers) a steep collapse or explosion must span: one steep step is a
    change of scale (unnormalised inputs, an embedding), two in a row are the initialisation."""

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
    """Samples per unit needed before a unit can be called dead, counted over the whole window (`dead_window`
    recorded steps, each with its batch): a healthy unit is silent on n samples with probability 2**-n, so with 8
    samples at most ~0.4% of healthy units look dead (a batch of 1 proves nothing)."""

    dead_window: int = 3
    """K: a unit is dead when it produced no positive output for any sample in each of its last K recorded steps
    (all of them while fewer are recorded; one for `inspect`). Three independent batches: a unit that a single
    unlucky batch leaves silent is not reported, and a unit that died in training is reported K recorded steps
    after its death, however long it was alive before (at most 63, the streaks actdiag.hooks.tracking counts)."""

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
    """Share of a float16 tensor's non-zero values in the subnormal range (below 2**-14, about to flush to zero) above
    which it is reported. Chosen here: a few stray tiny values are harmless, a twentieth of a layer's gradient is
    not (Micikevicius et al. 2018 show the gradients that fall below float16's range are what loss scaling exists
    to save)."""

    fp16_underflow_info_fraction_above: float = 0.25
    """The same share for float32 tensors, where the finding is only a note (info) on what float16 would do: chosen
    here so that a quarter of a layer's activations (or gradient, see `fp16_scalable_span`) must be at stake."""

    fp16_scalable_span: int = 40
    """Binades between float16's smallest subnormal (2**-24) and its largest value (65504, just under 2**16): a
    float32 gradient whose values span less than this is brought into float16's range by loss scaling, the standard
    float16 recipe (Micikevicius et al. 2018; torch.amp.GradScaler), however small it is. Only the share beyond this
    span below the gradient's largest value is lost in float16 whatever the scale, and only that is reported for
    float32 gradients."""

    lost_updates_fraction_above: float = 0.75
    """Share of a float16/bfloat16 parameter's elements with a non-zero gradient that the optimizer step left
    unchanged above which its updates are reported as lost (rules/rounding.py). The contract says "most"; three
    quarters, measured here (tests/rules/test_rules_precision_updates.py): a bfloat16 MLP under Adam at lr 1e-4,
    which does not learn, loses 74-98% of its updates per parameter, at lr 1e-3, which learns, 10-60%."""

    lost_updates_min_elements: int = 100
    """Elements with a non-zero gradient a parameter needs before its share of lost updates counts: over a hundred
    elements the share's standard error is at most 5 points, so a 10-element bias cannot decide alone."""

    # --- updates (rules/updates.py) -----------------------------------------------------------------------------
    update_ratio_above: float = 0.1
    """||dW||/||W|| per step above which updates are too large. Karpathy's CS231n notes put a healthy ratio near
    1e-3; 100 times that rewrites a tenth of a layer's weights every step."""

    update_ratio_below: float = 1e-6
    """||dW||/||W|| per step under which a layer has stalled outright (a thousandth of CS231n's healthy 1e-3). Under
    a learning-rate schedule the ratio is scaled to the schedule's peak rate first: a rate decayed on purpose is
    not a stall."""

    update_abs_above: float = 0.1
    """Per-element RMS of one step above which a parameter that started near zero (see `near_zero_rms_below`) has
    too large updates: measured against the unit scale that normalisation gains start at (BatchNorm and LayerNorm
    initialise gamma to 1), this is `update_ratio_above` of that scale."""

    near_zero_rms_below: float = 1e-3
    """Per-element RMS at the first recorded step under which a parameter counts as initialised near zero and is
    judged by the absolute size of its steps, not their ratio to its norm (after k steps that ratio is about 1/k at
    any learning rate). Zero-initialised BatchNorm gains of residual branches (Goyal et al. 2017, torchvision's
    `zero_init_residual`), ConvNeXt's layer scale of 1e-6 (Liu et al. 2022) and zero biases are under it; Xavier/He
    initialisation stays above it for any fan-in under a million, and so do the 0.02 of BERT/GPT-style inits."""

    stall_decay_below: float = 0.1
    """Training-time rule: the optimizer's step per unit of learning rate has fallen under this share of its value
    at the first recorded step at each of the last two recorded steps, both measured against the gradient (the
    effective step ||dW|| / (lr ||grad W||)) and on its own (||dW|| / lr), when the optimizer is not known (then
    the updates must also be under `stall_ratio_below`). AdaGrad's effective learning rate lr/sqrt(sum of squared
    gradients) falls like this by construction (Duchi et al. 2011; Zeiler 2012 introduced Adadelta to stop it).
    Known moving averages (RMSProp, Adam) and SGD are never judged by this fall: their first step differs from
    later ones for other reasons (RMSProp's unwarmed average makes it ~10x larger)."""

    accumulating_decay_below: float = 0.2
    """The same fall, under an optimizer known to shrink its own step (AdaGrad): a fivefold fall at each of the last
    two recorded steps is reported with no condition on the ratio itself, because the running sum of squared
    gradients never shrinks and the fall only continues (like 1/sqrt(steps) with steady gradients: fivefold by
    ~25 steps, tenfold by ~100, a hundredfold by ~10000); only another optimizer or a higher rate restores it."""

    stall_ratio_below: float = 1e-3
    """Update ratio (at the schedule's peak learning rate) under which a decaying step counts as stalled when the
    optimizer is not known (a hand-written update, a foreign optimizer class): CS231n's healthy 1e-3 ("lower than
    this, the learning rate might be too low"). Under AdaGrad the fall alone suffices: its step only keeps
    falling."""

    min_history: int = 4
    """Recorded steps needed before trend-based update rules speak: the first step and three after it, so that a
    fall is seen to hold over the last two (a watch recording every 50 steps has them after 150 steps)."""


DEFAULT_THRESHOLDS = Thresholds()


# ------------------------------------------------------------------------------------------------ setting them
PYPROJECT_TABLE = ("tool", "actdiag", "thresholds")


def threshold_names() -> tuple[str, ...]:
    """The names `Thresholds` accepts, in the order they are declared."""
    return tuple(f.name for f in dataclasses.fields(Thresholds))


def _field_kinds() -> dict[str, str]:
    # With `from __future__ import annotations` a field's type is its annotation's text ("float", "int", "bool").
    return {f.name: str(f.type) for f in dataclasses.fields(Thresholds)}


def _convert(name: str, value: object, kind: str, origin: str) -> float | int | bool:
    """`value` (a number, or text from the command line / a TOML file) as the field's type; ValueError naming it."""
    where = f" ({origin})" if origin else ""
    bad = f"threshold {name}={value!r}{where} is not "
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise ValueError(bad + "true or false")
    if isinstance(value, bool):  # bool is an int to Python, never a threshold to a person
        raise ValueError(bad + ("an integer" if kind == "int" else "a number"))
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError(bad + "an integer")
    number: float
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(bad + "a number") from None
    else:
        raise ValueError(bad + "a number")
    if math.isnan(number):
        raise ValueError(bad + "a number (NaN compares false with everything)")
    return number


def make_thresholds(
    values: Thresholds | Mapping[str, object] | None = None,
    *,
    base: Thresholds | None = None,
    origin: str = "",
) -> Thresholds:
    """`Thresholds` from a `Thresholds` (returned as is), a mapping of names to values (numbers, or numbers as text)
    laid over `base` (default: DEFAULT_THRESHOLDS), or None (`base`). An unknown name or a value that is not a
    number raises one ValueError that names it (and lists the valid names); `origin` says where the values came
    from, e.g. "--threshold" or "pyproject.toml"."""
    start = DEFAULT_THRESHOLDS if base is None else base
    if values is None:
        return start
    if isinstance(values, Thresholds):
        return values
    if not isinstance(values, Mapping):
        got = type(values).__name__
        raise TypeError(f"thresholds must be a Thresholds or a mapping of names to numbers, got {got}")
    kinds = _field_kinds()
    unknown = [str(k) for k in values if k not in kinds]
    if unknown:
        where = f" ({origin})" if origin else ""
        plural = "s" if len(unknown) > 1 else ""
        raise ValueError(
            f"unknown threshold{plural} {', '.join(unknown)}{where}; valid names: {', '.join(threshold_names())}"
        )
    changes = {str(k): _convert(str(k), v, kinds[str(k)], origin) for k, v in values.items()}
    return dataclasses.replace(start, **changes)  # type: ignore[arg-type]


def parse_threshold_option(text: str) -> tuple[str, str]:
    """'NAME=VALUE' -> (NAME, VALUE), both stripped; ValueError when the text is not of that form."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ValueError(f"{text!r} is not NAME=VALUE, e.g. saturation_fraction_at_least=0.3")
    return name.strip(), value.strip()


def find_pyproject(start: str | os.PathLike[str]) -> Path | None:
    """The nearest pyproject.toml in `start` (a folder, or a file's folder) or a folder above it, or None.

    The first one found is the project's, whether or not it has a `[tool.actdiag.thresholds]` table: the search
    stops at the project root as ruff and black do, so a parent project's settings never leak into a sub-project.
    """
    here = Path(start).resolve()
    if not here.is_dir():
        here = here.parent
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def pyproject_thresholds(path: str | os.PathLike[str]) -> dict[str, object]:
    """The `[tool.actdiag.thresholds]` table of a pyproject.toml ({} when it has none), not yet validated (pass it
    to `make_thresholds`). ValueError, naming the file, when it cannot be read or parsed."""
    import tomllib

    p = Path(path)
    try:
        with p.open("rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ValueError(f"cannot read {p}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{p} is not valid TOML: {exc}") from None
    table: object = doc
    for key in PYPROJECT_TABLE:
        if not isinstance(table, Mapping) or key not in table:
            return {}
        table = table[key]
    if not isinstance(table, Mapping):
        raise ValueError(f"[{'.'.join(PYPROJECT_TABLE)}] in {p} must be a table of NAME = number")
    return dict(table)
