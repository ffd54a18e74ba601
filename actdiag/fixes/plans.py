"""A fix for the layers a finding names: its text and snippet filled in from the catalogue, and, for the verifiable
ones, what `actdiag.fixes.verify` changes on a copy of the model. `Context` is what surrounds those layers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from actdiag.fixes.catalogue import CATALOGUE, MASTER, FixEntry
from actdiag.fixes.naming import module_assign, module_expr, wrapped
from actdiag.records import Finding, Fix, LayerStats
from actdiag.rules._common import (
    REINIT_TYPES,
    RELU_LIKE,
    SIGMOID_LIKE,
    TANH_LIKE,
    nonlinearity_after,
    weight_layer_before,
)
from actdiag.rules.activations import already_initialised

_MAX_LINES = 6  # beyond this many layers a snippet loops over their names instead of one line each


def _low_dtypes(model: nn.Module | None) -> frozenset[torch.dtype]:
    if model is None:
        return frozenset()
    return frozenset(p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16))


@dataclass(frozen=True, slots=True)
class Context:
    layers: tuple[LayerStats, ...]
    index: dict[str, int]
    model: nn.Module | None = None  # the user's model: how its containers index their children
    low: frozenset[torch.dtype] = frozenset()  # float16/bfloat16 among the model's parameters

    @classmethod
    def of(cls, layers: Sequence[LayerStats], model: nn.Module | None = None) -> Context:
        index: dict[str, int] = {}
        for i, layer in enumerate(layers):
            index.setdefault(layer.name, i)
        return cls(tuple(layers), index, model, _low_dtypes(model))

    def expr(self, name: str) -> str:
        return module_expr(name, model=self.model)

    def assign(self, name: str, value: str) -> str:
        return module_assign(name, value, self.model)

    def get(self, name: str | None) -> LayerStats | None:
        i = self.index.get(name) if name is not None else None
        return None if i is None else self.layers[i]

    def ordered(self, names: Sequence[str]) -> list[str]:
        known = [n for n in dict.fromkeys(names) if n in self.index]
        return sorted(known, key=lambda n: self.index[n])


def finding_layers(f: Finding) -> list[str]:
    return [n for n in (f.layer, *f.related) if n is not None]


def _nonlinearity(ctx: Context, name: str) -> str:
    """The `nonlinearity` argument of nn.init for the activation after weight layer `name`."""
    i = ctx.index[name]
    after = nonlinearity_after(ctx.layers, i)
    if after is None:
        return "linear"
    if after in ("LeakyReLU", "RReLU", "PReLU"):
        return "leaky_relu"
    if after in RELU_LIKE:
        return "relu"
    if after in TANH_LIKE:
        return "tanh"
    if after in SIGMOID_LIKE:
        return "sigmoid"
    return "linear"


def reinit_targets(ctx: Context, names: Sequence[str]) -> list[str]:
    return [n for n in ctx.ordered(names) if ctx.layers[ctx.index[n]].type in REINIT_TYPES]


def feeding_layers(ctx: Context, names: Sequence[str]) -> list[str]:
    """The weight layers that feed the named (activation) layers."""
    out = []
    for n in ctx.ordered(names):
        j = weight_layer_before(ctx.layers, ctx.index[n])
        if j is not None:
            out.append(ctx.layers[j].name)
    return list(dict.fromkeys(out))


@dataclass(frozen=True, slots=True)
class Plan:
    """A fix and, for the verifiable ones, how to apply it to a copy."""

    fix: Fix
    targets: tuple[str, ...] = ()
    nonlinearity: tuple[str, ...] = ()
    norm: tuple[tuple[str, int], ...] = ()  # (kind, features) per target for normalisation fixes
    reinit: tuple[str, ...] = ()  # weight layers to He-initialise along with an activation swap


def _line(ctx: Context, entry: FixEntry, name: str, **words: str) -> str:
    """The entry's snippet for one layer: the statement itself, or for a swap the assignment of its module."""
    code = entry.snippet.format(layer=ctx.expr(name), **words)
    return ctx.assign(name, code) if entry.swap else code


def _snippet(ctx: Context, entry: FixEntry, names: Sequence[str], **words: str) -> str:
    """The entry's snippet for layers `names`: one block per layer, or its loop over them when there are many."""
    if entry.loop and len(names) > _MAX_LINES:
        body = entry.snippet.format(layer="layer", **words).replace("\n", "\n    ")
        names_listed = wrapped([repr(n) for n in names])
        exprs = wrapped([ctx.expr(n) for n in names])
        code = entry.loop.format(layers=exprs, names=names_listed, body=body, **words)
    else:
        code = "\n".join(_line(ctx, entry, n, **words) for n in names)
    return "from torch import nn\n\n" + code


def init_plan(ctx: Context, targets: list[str], why: str) -> Plan | None:
    if not targets:
        return None
    nls = tuple(_nonlinearity(ctx, n) for n in targets)
    relu = sum(nl in ("relu", "leaky_relu") for nl in nls)
    he_fix = relu * 2 >= len(nls) and relu > 0
    if already_initialised([ctx.layers[ctx.index[n]] for n in targets], "he_init" if he_fix else "xavier_init", nls):
        return None  # never suggest the initialisation the model already has
    if he_fix:
        nl = "leaky_relu" if "leaky_relu" in nls and "relu" not in nls else "relu"
        he = CATALOGUE["he_init"]
        fix = Fix("he_init", he.text.format(n=len(targets), why=why), _snippet(ctx, he, targets, nl=nl))
        return Plan(fix, tuple(targets), tuple(nl for _ in targets))
    non_linear = [nl for nl in nls if nl in ("tanh", "sigmoid")]
    nl = max(set(non_linear), key=non_linear.count) if non_linear else "linear"
    gain = f', gain=nn.init.calculate_gain("{nl}")' if nl == "tanh" else ""
    kind = "tanh/sigmoid" if nl != "linear" else "linear"
    xavier = CATALOGUE["xavier_init"]
    text = xavier.text.format(n=len(targets), kind=kind, why=why)
    fix = Fix("xavier_init", text, _snippet(ctx, xavier, targets, gain=gain))
    return Plan(fix, tuple(targets), tuple(nl for _ in targets))


def _norm_kind(layer: LayerStats) -> tuple[str, int] | None:
    shape = layer.shape
    if len(shape) < 2:
        return None
    if len(shape) == 2:
        # BatchNorm needs more than one sample per channel in training mode.
        return ("BatchNorm1d", shape[1]) if shape[0] > 1 else ("LayerNorm", shape[1])
    if len(shape) == 3:
        if layer.type.startswith("Conv"):
            return ("BatchNorm1d", shape[1])
        return ("LayerNorm", shape[2])
    if len(shape) == 4:
        return ("BatchNorm2d", shape[1])
    if len(shape) == 5:
        return ("BatchNorm3d", shape[1])
    return None


def norm_plan(ctx: Context, targets: list[str], why: str) -> Plan | None:
    kinds = []
    names = []
    for n in targets:
        k = _norm_kind(ctx.layers[ctx.index[n]])
        if k is not None:
            kinds.append(k)
            names.append(n)
    if not names:
        return None
    batch = sum(k[0].startswith("BatchNorm") for k in kinds) * 2 >= len(kinds)
    code = "batchnorm" if batch else "layernorm"
    entry = CATALOGUE[code]
    if len(names) > _MAX_LINES:
        # The loop builds each norm from the layer itself, so it names the layer's width, not a number.
        k0 = kinds[0][0]
        feat = "layer.out_channels" if k0.startswith("BatchNorm") and k0 != "BatchNorm1d" else "layer.out_features"
        if k0 == "BatchNorm1d" and ctx.layers[ctx.index[names[0]]].type.startswith("Conv"):
            feat = "layer.out_channels"
        snippet = _snippet(ctx, entry, names, norm=k0, features=feat)
    else:
        lines = [_line(ctx, entry, n, norm=k, features=str(f)) for n, (k, f) in zip(names, kinds)]
        snippet = "from torch import nn\n\n" + "\n".join(lines)
    label = "BatchNorm" if batch else "LayerNorm"
    fix = Fix(code, entry.text.format(n=len(names), label=label, why=why), snippet)
    return Plan(fix, tuple(names), norm=tuple(kinds))


def swap_plan(ctx: Context, targets: list[str], code: str) -> Plan | None:
    # A functional activation's record ("block:tanh") is a call inside a forward, not a module that can be swapped.
    targets = [n for n in targets if ":" not in n]
    if not targets:
        return None
    entry = CATALOGUE[code]
    feeding = feeding_layers(ctx, targets) if entry.then else []
    lines = [_line(ctx, entry, n) for n in targets]
    lines += [entry.then.format(layer=ctx.expr(n)) for n in feeding]
    fix = Fix(code, entry.text, "from torch import nn\n\n" + "\n".join(lines))
    return Plan(fix, tuple(targets), reinit=tuple(feeding))


def setup_plan(code: str, f: Finding, ctx: Context, **words: str) -> Plan:
    """A fix that changes the training setup, not the model: its text and snippet name at most the finding's layer,
    and the model's dtype."""
    entry = CATALOGUE[code]
    layer = ctx.expr(f.layer) if f.layer else "model"
    # GradScaler refuses float16 weights: loss scaling on a model kept in float16 starts with float32 weights.
    master = MASTER if torch.float16 in ctx.low else ""
    words = {"layer": layer, "master": master, **words}
    return Plan(Fix(code, entry.text.format(**words), entry.snippet.format(**words)))
