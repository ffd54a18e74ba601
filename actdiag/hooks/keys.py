"""What the recorder keeps per recorded step is keyed by `Key`: whose tensor (a layer's call or a parameter) and
which of its quantities."""

from __future__ import annotations

from typing import Literal, NamedTuple

Owner = Literal["layer", "param"]
# A layer call's quantities: "act" (its output), "grad" (the gradient of the loss with respect to it), "sat"
# (saturation count), "units" (dead/rare/never unit counts), "unitvec" (per-unit counts, merged across ranks into
# "units"), "streak" (per-unit silence streaks, `tracking.UnitStreaks`), "input" (NaN/Inf count of the step's first
# input), "ingrad" (NaN/Inf count of the gradient with respect to its input). A parameter's: "weight", "grad",
# "update" (the norms of its update ratio), "lost" (elements with a non-zero gradient the optimizer step left
# unchanged, and how many had one).
Kind = Literal["act", "grad", "sat", "units", "unitvec", "streak", "input", "ingrad", "weight", "update", "lost"]


class Key(NamedTuple):
    """One recorded quantity. Keys sort the same way in every process (the merge across ranks relies on it)."""

    owner: Owner
    name: str  # the module's or the parameter's qualified name
    call: int  # the layer's call within the step (0 for a parameter)
    kind: Kind

    @classmethod
    def layer(cls, name: str, call: int, kind: Kind) -> Key:
        return _interned("layer", name, call, kind)

    @classmethod
    def param(cls, name: str, kind: Kind) -> Key:
        return _interned("param", name, 0, kind)

    @property
    def is_layer(self) -> bool:
        return self.owner == "layer"


# The keys of a recorded step, made once and reused at every step. A Key is a tuple subclass, which the garbage
# collector never stops tracking (it does so for plain tuples of numbers and strings only): keys made afresh at
# every step and held until its end were thousands of objects a step promoted to the oldest generation, bringing
# the next full collection of the user's process closer. A model has a fixed set of keys; the bound only guards
# against names that keep changing.
_INTERNED: dict[tuple[str, str, int, str], Key] = {}
_MAX_INTERNED = 1 << 16


def _interned(owner: Owner, name: str, call: int, kind: Kind) -> Key:
    spec = (owner, name, call, kind)
    key = _INTERNED.get(spec)
    if key is None:
        if len(_INTERNED) >= _MAX_INTERNED:
            _INTERNED.clear()
        key = _INTERNED[spec] = Key(owner, name, call, kind)
    return key


class LayerKeys(NamedTuple):
    """Every key of one layer call, made once per (layer, call) and kept: a hook or the decoding of a step looks
    them up by one dict access instead of making (or interning) each."""

    act: Key
    grad: Key
    sat: Key
    units: Key
    unitvec: Key
    streak: Key
    input: Key
    ingrad: Key


class ParamKeys(NamedTuple):
    """Every key of one parameter, as `LayerKeys`."""

    weight: Key
    grad: Key
    update: Key
    lost: Key


_LAYER_KINDS: tuple[Kind, ...] = ("act", "grad", "sat", "units", "unitvec", "streak", "input", "ingrad")
_PARAM_KINDS: tuple[Kind, ...] = ("weight", "grad", "update", "lost")
_LAYER_KEYS: dict[tuple[str, int], LayerKeys] = {}
_PARAM_KEYS: dict[str, ParamKeys] = {}


def layer_keys(name: str, call: int) -> LayerKeys:
    keys = _LAYER_KEYS.get((name, call))
    if keys is None:
        if len(_LAYER_KEYS) >= _MAX_INTERNED:
            _LAYER_KEYS.clear()
        keys = _LAYER_KEYS[(name, call)] = LayerKeys(*(Key.layer(name, call, kind) for kind in _LAYER_KINDS))
    return keys


def param_keys(name: str) -> ParamKeys:
    keys = _PARAM_KEYS.get(name)
    if keys is None:
        if len(_PARAM_KEYS) >= _MAX_INTERNED:
            _PARAM_KEYS.clear()
        keys = _PARAM_KEYS[name] = ParamKeys(*(Key.param(name, kind) for kind in _PARAM_KINDS))
    return keys
